"""Paired accuracy differences between two runs that answered the same items (pure Python).

Every run of a comparison answers the same items, so the difference of two accuracies is best judged item by
item: with per-item scores a_i, b_i in {0, 1}, d_i = a_i - b_i, the difference is mean(d) and its standard
error sd(d)/sqrt(n) (sample sd). Only the discordant items (b: a right and b wrong, c: the other way) move it:
mean(d) = (b - c)/n. The interval is mean(d) ± z·se (z = 1.96: 95%); McNemar's exact test gives the p-value
(two-sided binomial test of b against b + c at 1/2). "Within noise": the interval contains 0.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - m/2| >= |b - m/2|) for X ~ Binomial(m = b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_difference(a: list[float], ref: list[float], z: float = Z95) -> dict:
    """Accuracy of `a` minus that of `ref` over the same items (per-item scores in {0, 1}, same order).

    Returns {diff, lo, hi, se, n, a_only (b), ref_only (c), p, within_noise}; fractions, not percent."""
    if len(a) != len(ref):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(ref)}")
    n = len(a)
    if n == 0:
        raise ValueError("no items to compare")
    d = [x - y for x, y in zip(a, ref)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("inf")
    b = sum(1 for x, y in zip(a, ref) if x > y)
    c = sum(1 for x, y in zip(a, ref) if x < y)
    lo, hi = mean - z * se, mean + z * se
    return {"diff": mean, "lo": lo, "hi": hi, "se": se, "n": n, "a_only": b, "ref_only": c,
            "p": mcnemar_p(b, c), "within_noise": lo <= 0 <= hi}
