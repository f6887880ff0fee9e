"""The house limits on src/ as tests: no import cycle between lowbit's modules (top-level imports and imports
inside functions alike), no module reading another module's private names, and docs/architecture.md naming
only modules that exist. (Function and module sizes are the stop hook's to report.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: the lowbit modules it imports anywhere in its body}; `from pkg import name` counts as importing
    pkg.name when that is a module, else pkg."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted. A package's __init__
    importing its own submodules is not a cycle unless a submodule imports the package's names back."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "lowbit.train.trainer" in graph and graph["lowbit.train.trainer"]  # the graph is not empty
    assert cycles(graph) == []


def test_no_private_names_read_across_modules():
    """`from lowbit.x import _name` and `module._name` of another lowbit module: a private name is its own
    module's business (make it public or move the code)."""
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowbit"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") \
                            and f"{node.module}.{a.name}" not in mods:
                        bad.append(f"{mod}: from {node.module} import {a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = aliases.get(node.value.id)
                if target in mods and target != mod:
                    bad.append(f"{mod}: {node.value.id}.{node.attr}")
    assert bad == []


def test_architecture_names_every_module_and_only_modules_that_exist():
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, re.M))
    benches = set(re.findall(r"^\| `(bench/\w+\.py)` \|", text, re.M))
    assert sorted(b for b in benches if not (SRC.parent / b).exists()) == []
    actual = {str(p.relative_to(SRC / "lowbit")) for p in (SRC / "lowbit").rglob("*.py")}
    assert named, "the module table was not found"
    assert sorted(named - actual) == [], "named in docs/architecture.md but missing"
    assert sorted(actual - named) == [], "modules docs/architecture.md does not describe"
