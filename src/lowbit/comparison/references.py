"""Published small-scale FP4 results, as data: lowbit/references/*.json (rebuilt by bench/reference_tables.py
from the source repositories; each file names its repository, path and commit).

    quartet2_points()        Quartet II's final-loss gaps to BF16 per scheme, size and D/N
    quest_fit()              QuEST's scaling-law fit, L = E + A/(N*eff)^alpha + B/D^beta
    scaling_loss(fit, N, D, eff)

Both count N as non-embedding parameters (all but the token embedding and the output head): lowbit's
`count="reference"`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_DIR = Path(__file__).resolve().parents[1] / "references"
FILES = {"quartet2": "quartet2_runs.json", "quest": "quest_fit.json"}


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The parsed reference file `name` ("quartet2" or "quest")."""
    if name not in FILES:
        raise ValueError(f"unknown reference table {name!r}; known: {', '.join(FILES)}")
    return json.loads((_DIR / FILES[name]).read_text())


def quartet2_points(scheme: str | None = None) -> list[dict]:
    """Rows {scheme, label, lowbit_recipe, size, N, D, D_over_N, loss, bf16_loss, gap_pct} of Quartet II's table,
    of one scheme ("nvidia", "tetrajetv2", "quartetv2") or all."""
    data = load("quartet2")["schemes"]
    if scheme is not None and scheme not in data:
        raise ValueError(f"unknown Quartet II scheme {scheme!r}; known: {', '.join(data)}")
    return [{"scheme": k, "label": v["label"], "lowbit_recipe": v["lowbit_recipe"], **p}
            for k, v in data.items() if scheme in (None, k) for p in v["points"]]


def quest_fit() -> dict:
    """QuEST's fitted constants: {"A", "alpha", "B", "beta", "E", "eff": {precision: efficiency}, "source"}."""
    return load("quest")


def scaling_loss(fit: dict, n: float, d: float, eff: float = 1.0) -> float:
    """L(N, D) = E + A / (N * eff)^alpha + B / D^beta for the constants in `fit`."""
    return fit["E"] + fit["A"] / (n * eff) ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def citation(name: str) -> str:
    src = load(name)["source"]
    return f"{src['repo']} {src['path']} @ {src['commit'][:10]}"
