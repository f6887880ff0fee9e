"""Group scales from group absmaxes: the scale rules of `TensorQuant.scale_fmt`, `scale_round` and
`reciprocal` (quant.py's quantizers call these; nothing here touches the elements).

A scale rule returns, per group, the fp32 *decode* scale s (dequantized value = code · s) and, with
`q.reciprocal`, the fp32 *encode* factor e the elements are multiplied by before rounding (code =
round(x · e)); without it the elements are divided by s (code = round(x / s)). The two conventions
differ only in the last bit of x/s, i.e. on exact ties of the element grid:

    divide (lowbit's default)        s = amax / fmax; x / s
    reciprocal (TE / torchao)        e = fmax / amax, s = 1 / e; x · e          (fp32 scales)
    NVFP4, divide                    s_t = amax_t / (fmax·448); s = e4m3(amax / fmax / s_t) · s_t
    NVFP4, reciprocal (TE's rule)    g = fmax·448 / amax_t; d = e4m3(min(amax / fmax · g, 448));
                                     s = d · (1/g); e = min(1 / s, fp32 max)   (d may round to 0: the
                                     group then dequantizes to 0, as in TE; divide raises d to 2^-9)
    e8m0 floor (OCP MX)              s = 2^(floor(log2 amax) − emax_elem): the top values may saturate
    e8m0 ceil (RCEIL: torchao, TE    s = 2^ceil(log2(amax / fmax)): nothing saturates
      MXFP8, DeepSeek UE8M0)

Powers of two are exact, so for e8m0 scales the two conventions agree bit for bit.
"""
from __future__ import annotations

import math

import torch

from lowbit.formats import Format, get_format, round_to_grid_
from lowbit.groups import tree_sum
from lowbit.tensor_quant import TensorQuant

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9
FP32_MIN_NORMAL = 2.0 ** -126
FP32_MAX = torch.finfo(torch.float32).max
# "4 over 6" (Cook et al. 2025): the tensor scale leaves the block scales headroom for the ×1.5 of the
# map-to-4 candidate (256 · 1.5 = 384 <= 448).
E4M3_MAX_4OVER6 = 256.0
_E4M3 = get_format("e4m3")


def _div(a: torch.Tensor, c: float) -> torch.Tensor:
    """a / c, correctly rounded on every device. (On CUDA, PyTorch turns a division by a Python number into a
    multiplication by its reciprocal, which differs from a / c in the last bit for c = 6 and 448: scales, and so
    codes, would depend on the device. Dividing by a tensor is a true division everywhere.)"""
    return a / torch.full_like(a, c)


def _to_e4m3_(s: torch.Tensor) -> torch.Tensor:
    """Round fp32 s onto the E4M3 grid in place (saturating at 448)."""
    round_to_grid_(s.view(-1), _E4M3, torch.empty_like(s).view(-1))
    return s


def _pow2(amax: torch.Tensor, q: TensorQuant, fmt: Format) -> torch.Tensor:
    if q.scale_round == "floor":
        # 2^floor(log2 amax) is amax's exponent bits; times 2^-emax it is exact (a power of two)
        s = torch.bitwise_and(amax.view(torch.int32), 0x7F800000).view(torch.float32)
        return s.mul_(2.0 ** -fmt.emax).clamp_min_(2.0 ** -127)  # amax < 2^-126 -> 2^-127 (E8M0's min)
    # ceil, exactly (no log2 rounding): r = m·2^k with m in [0.5, 1); 2^ceil(log2 r) = 2^(k-1) iff m == 0.5
    m, k = torch.frexp(_div(amax, fmt.max))
    k = k - (m == 0.5).to(k.dtype)
    return torch.ldexp(torch.ones_like(amax), k.clamp_(-127, 127))


def nvfp4_tensor_scale(amax, tensor_amax, fmt, block_max):
    """(t, s_t): NVFP4's fp32 tensor absmax (tensor_amax, or the max of the group absmaxes amax) and tensor
    scale t / (fmt.max · block_max), 1 where that is 0."""
    t = (amax.amax() if tensor_amax is None else tensor_amax).float()
    s_t = _div(t, fmt.max * block_max)
    return t, torch.where((t == 0) | (s_t == 0), 1.0, s_t)


def _nvfp4(amax, q, fmt, tensor_amax, block_max=E4M3_MAX):
    """(decode s, encode e or None) of NVFP4's two-level scale."""
    if q.reciprocal:  # Transformer Engine's reference rule (quantization_nvfp4), step by step
        t = (amax.amax() if tensor_amax is None else tensor_amax).float()
        g = (fmt.max * block_max / t).clamp_max_(FP32_MAX)
        g = torch.where(g == 0, 1.0, g)
        d = _to_e4m3_((_div(amax, fmt.max) * g).clamp_max_(E4M3_MAX))
        s = d * (1.0 / g)
        e = (1.0 / s).clamp_max_(FP32_MAX)
        return s.masked_fill_(~(t < math.inf), math.nan), e
    t, s_t = nvfp4_tensor_scale(amax, tensor_amax, fmt, block_max)
    s = _to_e4m3_(_div(amax, fmt.max) / s_t).clamp_min_(E4M3_MIN_SUBNORMAL).mul_(s_t)
    return s.masked_fill_(~(t < math.inf), math.nan), None  # a non-finite tensor absmax: every group


QUEST_CLIP = 2.92247856  # QuEST's MSE-optimal clip for E2M1 on Gaussian data, in standard deviations


def _std(x: torch.Tensor) -> torch.Tensor:
    """(std, var) over the last dim of fp32 x, sums pairwise (groups.tree_sum: the order kernels/quest.c repeats)."""
    n = x.shape[-1]
    d = x.dim() - 1  # tree_sum takes a non-negative dim
    mean = tree_sum(x, d) / n
    var = tree_sum(x.square(), d) / n - mean.square()
    return torch.where(var >= 0, var.clamp_min(0).sqrt(), 1.0), var


def quest_scale(x3: torch.Tensor, fmt: Format) -> torch.Tensor:
    """QuEST's power-of-two scale per group of x3 [R, G, B] -> [R, G, 1] fp32, as Quartet's code computes it:
    2^floor(log2(QUEST_CLIP/fmax · std + 1e-8)), std from E[x²] − E[x]² (1 where that is negative by
    rounding; both means summed pairwise, so the CPU kernel repeats them bit for bit). Groups whose squares
    overflow fp32 take the std of x/absmax times absmax instead; a group holding NaN or inf gets a NaN scale."""
    x = x3.float()
    std, var = _std(x)
    a = x.abs().amax(-1, keepdim=True)
    big = ~torch.isfinite(var) & torch.isfinite(a)
    std = torch.where(big, _std(x / torch.where(big, a, 1.0))[0] * a, std)
    m, k = torch.frexp(std * (QUEST_CLIP / fmt.max) + 1e-8)
    s = torch.ldexp(torch.ones_like(std), (k - 1).clamp_(-127, 127))  # 2^floor(log2 v), v = m·2^k, m in [0.5, 1)
    return s.masked_fill_(~torch.isfinite(a), math.nan)


def scale_from_amax(amax: torch.Tensor, q: TensorQuant, fmt: Format,
                    tensor_amax: torch.Tensor | None = None,
                    block_max: float = E4M3_MAX) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(decode scale s, encode factor e or None) per group from the fp32 group absmax (>= 0, inf or NaN;
    same shape as amax). e is None unless q.reciprocal. tensor_amax: NVFP4's tensor absmax when amax holds
    only part of the groups; block_max: the E4M3 value the tensor's largest group scale maps to.
    An all-zero group gets s = e = 1 (zeros stay zeros); an inf/NaN absmax a NaN scale. Few, in-place ops:
    it runs once per chunk on up to 64k groups."""
    e = None
    if q.scale_fmt == "fp32":
        if q.reciprocal:
            e = torch.where(amax == 0, 1.0, fmt.max / amax).clamp_max_(FP32_MAX)
            s = 1.0 / e
        else:
            # at least fp32's smallest normal, 2^-126: a subnormal scale would lose relative precision,
            # and x / s could then exceed max (see `saturate` in quant._run)
            s = _div(amax, fmt.max).clamp_min_(FP32_MIN_NORMAL)
    elif q.scale_fmt == "e8m0":
        s = _pow2(amax, q, fmt)
        e = 1.0 / s if q.reciprocal else None  # exact: a power of two
    else:
        s, e = _nvfp4(amax, q, fmt, tensor_amax, block_max)
    if q.scale_mult != 1.0:
        s = s * q.scale_mult
        e = None if e is None else _div(e, q.scale_mult).clamp_max_(FP32_MAX)
    zero, bad = amax == 0, ~(amax < math.inf)
    s.masked_fill_(zero, 1.0).masked_fill_(bad, math.nan)
    if e is not None:
        e = e.masked_fill(zero, 1.0).masked_fill_(bad, math.nan)
    return s, e
