"""The FP4 paper's two estimators (Wang et al., ICML 2025, arXiv 2501.17116).

DGE, the differentiable gradient estimator (for weights)
--------------------------------------------------------
Inside one quantization interval [q_lo, q_hi] of width δ (the local step of the
format's grid, in the *scaled* domain, i.e. after dividing by the absmax scale)
the step function of round-to-nearest is replaced by the smooth, monotone

    f(x) = q_lo + δ·(1 + sign(t)·|t|^(1/k)) / 2,      t = 2u/δ − 1,  u = x − q_lo,

which meets the grid at both ends (f(q_lo) = q_lo, f(q_hi) = q_hi) and steepens
towards the rounding midpoint as k grows (k = 1 is the identity, k → ∞ the
hard quantizer). Its derivative,

    f'(x) = (1/k)·|t|^(1/k − 1),   clamped at `clamp` (3.0) near the midpoint (t → 0),

multiplies the weight gradient elementwise in the backward pass. On a grid point
f' = 1/k. The grid used is the format's own (for E2M1 the steps are 0.5 on
[0, 2), 1 on [2, 4), 2 on [4, 6]); negative values use the mirrored interval,
so f is odd and f' even.

Saturated values (|x| > fmt.max; only possible with delayed, power-of-two or
two-level scales, never with fp32 current absmax scaling, which maps the absmax
onto max exactly) get f' = 0: the saturating quantizer is flat there, and this
is what the reference implementation's PyTorch version does (its CUDA kernel
gives 0 above +6 but extends the [−6, −4] interval below −6, an asymmetry we do
not copy). x = ±max itself belongs to the outermost interval (f' = 1/k).

OCC, outlier clamping and compensation (for activations)
--------------------------------------------------------
`occ_clamp(x, alpha)` clamps x to its [1−alpha, alpha] quantiles, taken over the
whole tensor (signed values), and returns the sparse residual ΔX = x − clamp(x)
that QLinear multiplies by the weight in high precision. The quantiles are exact
order statistics with numpy's default "linear" interpolation (Hyndman & Fan type
7: position q·(n−1), interpolating between the two neighbouring order
statistics), so they agree with `numpy.quantile(x, q)`. (The reference code
indexes the sorted tensor at int(q·n) without interpolation; the two differ by
at most one order statistic.) torch.quantile is not used: it sorts the whole
tensor and refuses tensors above 16M elements.
"""
from __future__ import annotations

import math

import torch

from lowbit.formats import Format, get_format
from lowbit.kernels import dge as dge_kernels
from lowbit.kernels import occ as occ_kernels
from lowbit.powers import power

# --- DGE -----------------------------------------------------------------------------------


def _check_dge_format(fmt: Format) -> None:
    if fmt.passthrough or not fmt.signed:
        raise ValueError(f"DGE needs a low-bit element format (e2m1, e1m2, e3m0, e4m3, e5m2), got {fmt.name!r}")


def _interval(a: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_lo, δ) of the grid interval [q_lo, q_lo + δ) that holds each magnitude a >= 0.

    The step at a is 2^(max(floor(log2 a), emin) − mbits) for every IEEE-style format
    (subnormals included), and q_lo = floor(a / δ)·δ (exact: δ is a power of two).
    """
    if a.dtype == torch.float32:
        # 2^floor(log2 a) is a's exponent bits (0 for a subnormal or zero a, raised to 2^emin below): three cheap
        # passes where frexp + ldexp cost ~10x more
        p2 = torch.bitwise_and(a.view(torch.int32), 0x7F800000).view(torch.float32)
        delta = p2.clamp_min_(2.0 ** fmt.emin).mul_(2.0 ** -fmt.mbits)
    else:
        e = torch.frexp(a).exponent - 1  # floor(log2 a) for a > 0; a = 0 gives -1 (clamped below)
        delta = torch.ldexp(torch.ones_like(a), e.clamp_min(fmt.emin) - fmt.mbits)
    return torch.floor(a / delta) * delta, delta


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dge_derivative(x_scaled: torch.Tensor, fmt: str | Format = "e2m1", k: float = 5.0,
                   clamp: float = 3.0) -> torch.Tensor:
    """f'(x) of the DGE elementwise on the scaled weight (see the module docstring).

    x_scaled: float tensor of any shape: the weight divided by its quantization scale
    (`lowbit.quant.scaled_values`). Returns fp32 (fp64 for fp64 input) of x's shape:
    min((1/k)·|2u/δ − 1|^(1/k − 1), clamp) inside the grid, 0 where |x| > fmt.max,
    NaN where x is NaN.
    """
    fmt = get_format(fmt)
    _check_dge_format(fmt)
    if not isinstance(x_scaled, torch.Tensor) or not x_scaled.is_floating_point():
        raise TypeError(f"x_scaled must be a floating-point torch.Tensor, got {getattr(x_scaled, 'dtype', type(x_scaled))}")
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if clamp <= 0:
        raise ValueError(f"clamp must be > 0, got {clamp}")
    a = x_scaled.to(_work_dtype(x_scaled)).abs()
    q_lo, delta = _interval(a, fmt)
    t = ((a - q_lo) * (2.0 / delta) - 1.0).abs()  # in [0, 1]
    e = 1.0 / k - 1.0  # fp32: lowbit.powers' fixed operations, which the CPU kernel repeats (fp64: torch.pow)
    d = (power(t, e) if t.dtype == torch.float32 else t.pow(e)).div_(k).clamp_max_(clamp)  # t = 0 -> inf -> clamp
    return d.masked_fill_(a > fmt.max, 0.0)  # NaN stays NaN (NaN > max is False)


def dge_apply(dw: torch.Tensor, x_scaled: torch.Tensor, fmt: str | Format = "e2m1", k: float = 5.0,
              clamp: float = 3.0) -> torch.Tensor:
    """dw.float() · dge_derivative(x_scaled, fmt, k, clamp): the weight gradient with the DGE factor, fp32 of
    dw's shape (on CPU fused by lowbit.kernels, the same values bit for bit)."""
    fmt = get_format(fmt)
    _check_dge_format(fmt)
    if k <= 0 or clamp <= 0:
        raise ValueError(f"k and clamp must be > 0, got k={k}, clamp={clamp}")
    fused = dge_kernels.dge_apply(dw, x_scaled, fmt, k, clamp)
    return fused if fused is not None else dw.float() * dge_derivative(x_scaled, fmt, k, clamp)


def dge_function(x_scaled: torch.Tensor, fmt: str | Format = "e2m1", k: float = 5.0) -> torch.Tensor:
    """The DGE's smooth stand-in f(x) for the quantizer (module docstring), elementwise;
    ±fmt.max beyond the range. Used to check dge_derivative by finite differences and to
    plot the estimator. Returns fp32 (fp64 for fp64 input)."""
    fmt = get_format(fmt)
    _check_dge_format(fmt)
    x = x_scaled.to(_work_dtype(x_scaled))
    a = x.abs()
    q_lo, delta = _interval(a, fmt)
    t = (a - q_lo) * (2.0 / delta) - 1.0
    f = q_lo + delta * (1.0 + torch.sign(t) * t.abs().pow(1.0 / k)) / 2.0
    f = torch.where(a > fmt.max, torch.full_like(a, fmt.max), f)
    return torch.copysign(f, x)


# --- OCC -----------------------------------------------------------------------------------

_SAMPLE = 1 << 16  # sample size for the bracketing pre-pass of the exact selection (CPU)


def _lerp(a: torch.Tensor, b: torch.Tensor, g: float) -> torch.Tensor:
    """numpy's linear interpolation a + (b − a)·g (written from b for g >= 0.5, as numpy does)."""
    return b - (b - a) * (1.0 - g) if g >= 0.5 else a + (b - a) * g


def _extreme_pair(x: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th and (k−1)-th largest values of flat x (or smallest, if not largest); the
    second equals the first when k == 1. Exact.

    On CPU a random sample (fixed seed: deterministic) first gives a value
    t that, with overwhelming probability, has at least k elements beyond it; only those
    (about k + a 5-sigma margin) are then selected exactly. If the bracket is too narrow
    the whole tensor is used, so the result never depends on the sample.
    """
    n = x.numel()
    cand = x
    if x.device.type == "cpu" and n > 4 * _SAMPLE and k < n // 2 and not torch.compiler.is_compiling():
        g = torch.Generator().manual_seed(0)
        s = x[torch.randint(0, n, (_SAMPLE,), generator=g)]
        p = k / n
        frac = p + 5.0 * math.sqrt(p * (1.0 - p) / _SAMPLE) + 2.0 / _SAMPLE
        r = math.ceil(frac * _SAMPLE)
        if r < _SAMPLE // 2:
            if largest:
                t = torch.kthvalue(s, _SAMPLE - r + 1).values
                tail = x[x >= t]
            else:
                t = torch.kthvalue(s, r).values
                tail = x[x <= t]
            if tail.numel() >= k:  # every element outside the tail is beyond all of it
                cand = tail
    v = torch.topk(cand, k, largest=largest, sorted=True).values
    return v[k - 1], v[max(k - 2, 0)]


def quantile_pair(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (1−alpha, alpha) quantiles of all elements of x, numpy 'linear' interpolation.
    Returns two 0-d fp64 tensors on x's device. NaN in x gives NaN quantiles."""
    xf = x.reshape(-1)
    n = xf.numel()
    has_nan = torch.isnan(xf).any()
    eager_cpu = xf.device.type == "cpu" and not torch.compiler.is_compiling()  # compiled: no data-dependent branch
    if eager_cpu and has_nan:  # (on accelerators and under torch.compile: no sync, NaN is put in below)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=x.device)
        return nan, nan.clone()

    def q(level, largest):
        pos = level * (n - 1)  # numpy's virtual index (float64), as numpy computes it
        j = math.floor(pos)
        g = pos - j
        # sorted[j] and sorted[j+1] (ascending): the (n−j)-th / (n−j−1)-th largest, or the
        # (j+1)-th / (j+2)-th smallest
        if largest:
            a, b = _extreme_pair(xf, n - j, largest=True)
        else:
            b, a = _extreme_pair(xf, min(j + 2, n), largest=False)
            if j + 1 >= n:
                a = b
        return _lerp(a.double(), b.double(), g)

    lo, hi = q(1.0 - alpha, largest=False), q(alpha, largest=True)
    if not eager_cpu:
        lo, hi = (torch.where(has_nan, math.nan, t) for t in (lo, hi))
    return lo, hi


def occ_clamp(x: torch.Tensor, alpha: float = 0.99
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clamp x to its [1−alpha, alpha] quantiles (over all elements, signed values).

    x: float tensor of any shape. alpha in (0.5, 1]; alpha == 1 clamps nothing (the
    thresholds are then x's min and max, x itself is returned, and the residual is zeros).
    Returns (x_clamped, residual, threshold_lo, threshold_hi): x_clamped and residual
    = x − x_clamped have x's shape and dtype (the residual is nonzero on about
    2·(1−alpha) of the entries); the thresholds are 0-d tensors of x's dtype (the
    exact bounds the clamp used; the quantiles rounded to x's dtype).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not 0.5 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0.5, 1], got {alpha}")
    if x.numel() == 0:
        raise ValueError("occ_clamp needs a non-empty tensor, got shape " + str(tuple(x.shape)))
    if alpha == 1.0:
        return x, torch.zeros_like(x), x.min(), x.max()
    lo, hi = quantile_pair(x, alpha)
    lo, hi = lo.to(x.dtype), hi.to(x.dtype)
    xc = torch.clamp(x, lo, hi)
    return xc, x - xc, lo, hi


def occ_row_ranks(K: int, alpha: float) -> tuple[int, int]:
    """The ranks (0-based, ascending) of the per-token bounds in a row of K: the authors' int((1−α)·K) and
    int(α·K) (at most K − 1), in Python floats as their code computes them."""
    return int((1 - alpha) * K), min(int(alpha * K), K - 1)


def occ_clamp_rows(x: torch.Tensor, alpha: float = 0.99
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OCC per token, as the FP4 paper's authors' code does it: clamp each row of x [M, K] to its own
    [sorted_row[int((1−alpha)·K)], sorted_row[int(alpha·K)]] (their index rule, no interpolation).

    Returns (x_clamped, residual, lo [M, 1], hi [M, 1]) in x's dtype; alpha in (0.5, 1) (alpha == 1 clamps
    nothing: the bounds are each row's min and max). A NaN in a row sorts last (torch.sort), as on a GPU."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"x must be a 2-D floating-point torch.Tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not 0.5 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0.5, 1], got {alpha}")
    K = x.shape[1]
    if K == 0 or x.shape[0] == 0:
        raise ValueError("occ_clamp_rows needs a non-empty tensor, got shape " + str(tuple(x.shape)))
    i_lo, i_hi = occ_row_ranks(K, alpha)
    fused = occ_kernels.occ_rows(x, i_lo, i_hi)  # CPU: the same values in one pass (lowbit.kernels)
    if fused is not None:
        return fused
    # sorted_row[i] from the two tails only: topk of the few extreme values is ~8x faster than a full sort
    lo = torch.topk(x, i_lo + 1, dim=1, largest=False).values[:, -1:]
    hi = torch.topk(x, K - i_hi, dim=1, largest=True).values[:, -1:]
    xc = torch.minimum(torch.maximum(x, lo), hi)
    return xc, x - xc, lo, hi
