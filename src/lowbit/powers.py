"""t^e for fp32 t ≥ 0 by one fixed sequence of fp32 operations, so that eager PyTorch and the compiled CPU kernel
(kernels/dge.c, DGE's derivative) give the same bits. torch.pow is vectorised by SLEEF on one CPU path and by
libm on the scalar tail, and no C code can promise its bits; this can be repeated operation by operation.

    t = 2^E · m, m in [√½, √2)           (the exponent and mantissa bits; exact)
    log2 t = E + s·P(s²),  s = (m − 1)/(m + 1)    (P: 2/ln 2 · the atanh series to s⁹)
    y = clamp(e · log2 t, −126, 127),  n = round(y) (half to even),  f = y − n   (exact)
    t^e = Q(f) · 2^n                     (Q: the Taylor series of 2^f to f⁷)

Within (3 + 1.5·|e·log2 t|) ulp of the exact power (tests/test_powers.py; DGE's t^e lies in [1, 2^8] for the k
users pick, where torch.pow is within 1-2 ulp); results are held to [2^-126, 2^127·√2] (y is clamped); t below
2^-126 (zero, subnormals) gives 0^e (inf for e < 0, 1 for e = 0, 0 for e > 0), NaN gives NaN. Every product and sum is its
own fp32 rounding (the C is compiled without FMA contraction), each constant is the fp32 value listed here.
"""
from __future__ import annotations

import math

import torch

# Horner order (highest power first), rounded to fp32 once here: the kernel receives these very values
LOG2_POLY = tuple(float(torch.tensor(2 / math.log(2) / (2 * i + 1), dtype=torch.float32)) for i in (4, 3, 2, 1, 0))
EXP2_POLY = tuple(float(torch.tensor(math.log(2) ** i / math.factorial(i), dtype=torch.float32))
                  for i in (7, 6, 5, 4, 3, 2, 1, 0))
SQRT2 = float(torch.tensor(math.sqrt(2), dtype=torch.float32))
MIN_NORMAL = 2.0 ** -126


def _horner(coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    p = torch.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        p = p * x + c
    return p


def power(t: torch.Tensor, e: float) -> torch.Tensor:
    """t^e elementwise (module docstring): t fp32 (≥ 0 or NaN), e a Python float (rounded to fp32 as torch
    rounds a scalar operand). Returns fp32 of t's shape."""
    if t.dtype != torch.float32:
        raise TypeError(f"power takes fp32, got {t.dtype}")
    b = t.view(torch.int32)
    E = ((b >> 23) - 127).to(torch.float32)
    m = ((b & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > SQRT2
    m, E = torch.where(big, m * 0.5, m), torch.where(big, E + 1.0, E)
    s = (m - 1.0) / (m + 1.0)
    y = ((s * _horner(LOG2_POLY, s * s) + E) * e).clamp(-126.0, 127.0)
    n = torch.round(y)
    two_n = ((n.nan_to_num(0.0).to(torch.int32) + 127) << 23).view(torch.float32)
    r = _horner(EXP2_POLY, y - n) * two_n
    zero_pow = math.inf if e < 0 else 1.0 if e == 0 else 0.0
    r = torch.where(t < MIN_NORMAL, zero_pow, r)
    return torch.where(t.isnan(), math.nan, r)
