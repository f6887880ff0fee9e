from lowbit.compare import compare  # noqa: F401  (stdlib-only imports at module level: no torch on `import lowbit`)


def __getattr__(name):  # lazy, so `import lowbit` stays torch-free: lowbit.convert / lowbit.QLinear
    if name in ("convert", "QLinear"):
        from lowbit import nn
        return getattr(nn, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
