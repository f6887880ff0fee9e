from lowbit.compare import compare  # noqa: F401  (stdlib-only imports at module level: no torch on `import lowbit`)
