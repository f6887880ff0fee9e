"""Fit lowbit's own ladder with QuEST's scaling form and read off each recipe's parameter efficiency.

    L(N, D, recipe) = E + A / (N * eff_recipe)^alpha + B / D^beta,   eff_bf16 = 1

Fitted in log space (as QuEST fits): for each (alpha, beta) on a grid, A, B, E come from linear least squares on
the bf16 points and every other recipe's eff from a 1-D search on its own points; the grid point with the smallest
total squared log residual wins. Needs bf16 points at >= 2 distinct N and >= 2 distinct D/N, and at least four
bf16 runs.
"""
from __future__ import annotations

import math

import numpy as np

_ALPHAS = np.linspace(0.05, 1.0, 39)
_BETAS = np.linspace(0.05, 1.0, 39)
_EFFS = np.exp(np.linspace(math.log(0.05), math.log(4.0), 400))


def _linear_fit(n, d, loss, alpha, beta):
    """(A, B, E, sum of squared log residuals) for fixed exponents; None when a constant comes out negative."""
    x = np.stack([n ** -alpha, d ** -beta, np.ones_like(n)], axis=1)
    coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
    if (coef < 0).any():
        return None
    pred = x @ coef
    return (*coef, float(((np.log(loss) - np.log(pred)) ** 2).sum()))


def _eff(points, a, alpha, b, beta, e):
    """Best eff on the grid for one recipe's points [(N, D, L)], with its squared log residual."""
    n, d, loss = (np.array(v, dtype=float) for v in zip(*points))
    pred = e + a / np.outer(_EFFS, n) ** alpha + b / d ** beta  # [effs, points]
    res = ((np.log(loss) - np.log(pred)) ** 2).sum(axis=1)
    i = int(res.argmin())
    return float(_EFFS[i]), float(res[i]), i in (0, len(_EFFS) - 1)


def fit(points: dict[str, list[tuple[float, float, float]]], reference: str = "bf16") -> dict:
    """points: {recipe: [(N, D, loss), ...]}. Returns {"status": "fitted" | "not fitted: <why>", "A", "alpha",
    "B", "beta", "E", "eff": {recipe: value}, "eff_at_bound": [recipes whose eff hit the search bound]}."""
    ref = points.get(reference) or []
    # >= 2 D/N values, not just >= 2 D: on one D/N line N and D move together and cannot be told apart
    if len({p[0] for p in ref}) < 2 or len({round(p[1] / p[0], 6) for p in ref}) < 2 or len(ref) < 4:
        return {"status": f"not fitted: needs {reference} runs at >= 2 sizes and >= 2 D/N values (>= 4 runs); "
                          f"has {len(ref)} run(s) at {len({round(p[1] / p[0], 6) for p in ref})} D/N value(s)"}
    n, d, loss = (np.array(v, dtype=float) for v in zip(*ref))
    best = None
    for alpha in _ALPHAS:
        for beta in _BETAS:
            lin = _linear_fit(n, d, loss, alpha, beta)
            if lin is None:
                continue
            a, b, e, r0 = lin
            effs = {k: _eff(v, a, alpha, b, beta, e) for k, v in points.items() if k != reference and v}
            total = r0 + sum(v[1] for v in effs.values())
            if best is None or total < best[0]:
                best = (total, a, float(alpha), b, float(beta), e, effs)
    if best is None:
        return {"status": "not fitted: no exponent pair gives non-negative A, B, E"}
    total, a, alpha, b, beta, e, effs = best
    return {"status": "fitted", "A": float(a), "alpha": alpha, "B": float(b), "beta": beta, "E": float(e),
            "eff": {k: v[0] for k, v in effs.items()}, "eff_at_bound": sorted(k for k, v in effs.items() if v[2]),
            "log_residual_ss": total}
