"""The first half of every quantizer: the absmax of each group of a [R, G, B] view (lowbit.groups.as3d) and the
scales it gives (the rules themselves live in lowbit.scales). quant owns the element pass; this module owns
where the scales come from (the measured absmax, a delayed amax, or QuEST's σ).

    group_absmax(xc)           fp32 max |x| over the last dim of [r, G, B] -> [r, G, 1] (NaN propagates)
    absmax3(x3, q)             per-group absmax as [R|1, G, 1] for q's granularity (blocks: over the block-row)
    scales3(x3, q, fmt, amax)  (decode scales, encode factors or None) as [R|1, G, 1] fp32
"""
from __future__ import annotations

import torch

from lowbit.buffers import scratch
from lowbit.kernels.reduce import group_absmax as fused_group_absmax
from lowbit.scales import E4M3_MAX, E4M3_MAX_4OVER6, quest_scale, scale_from_amax
from lowbit.tensor_quant import TensorQuant


def group_absmax(xc: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 max |x| over the last dim of xc [r, G, B] -> [r, G, 1]; propagates NaN. On CPU the C kernel's one
    read-only pass (a max does not depend on its order: the same values); else eager, through `buf` (an fp32
    buffer of xc's size that may be overwritten; a scratch buffer when None)."""
    fused = fused_group_absmax(xc)
    if fused is not None:
        return fused
    r, G, B = xc.shape
    # |x| into the fp32 buffer first: a reduction of contiguous fp32 runs is 3-10x faster than amax/amin of
    # bf16 groups; for short groups max_pool beats torch's inner-dim reduction again
    a = (scratch(xc.numel(), xc.device, 2) if buf is None else buf).view(xc.shape)
    torch.abs(xc, out=a) if xc.dtype == torch.float32 else a.copy_(xc).abs_()
    if B < 32 and G > 1:
        return torch.nn.functional.max_pool1d(a.view(r, 1, G * B), B, B).view(r, G, 1)
    return a.amax(-1, keepdim=True)


def absmax3(x3: torch.Tensor, q: TensorQuant) -> torch.Tensor:
    """fp32 absmax per group as [R|1, G, 1] (block: per row, the max over its block-row)."""
    if q.granularity == "tensor":
        # no |x| temporary; both forms propagate NaN. fp32: amax + amin (two vectorized reads) is faster;
        # bf16/fp16: aminmax's single pass (measured 3x amax + amin on a [512, 1536] bf16 CPU tensor)
        lo, hi = (x3.amin(), x3.amax()) if x3.dtype == torch.float32 else torch.aminmax(x3)
        return torch.maximum(hi, lo.neg()).float().view(1, 1, 1)
    amax = group_absmax(x3)
    if q.granularity == "block":
        R, G, _ = amax.shape
        b = q.block
        amax = amax.view(R // b, b, G).amax(1, keepdim=True).expand(R // b, b, G).reshape(R, G, 1)
    return amax


def scales3(x3: torch.Tensor, q: TensorQuant, fmt, amax) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(decode scales, encode factors or None) as [R|1, G, 1] fp32, from `amax` (delayed) or x3's groups."""
    if amax is not None:
        if q.granularity != "tensor":
            raise ValueError(f"amax= (delayed scaling) is only defined for granularity='tensor', "
                             f"got granularity={q.granularity!r}; drop amax= to use the current absmax")
        a = torch.as_tensor(amax, dtype=torch.float32, device=x3.device)
        if a.numel() != 1:
            raise ValueError(f"amax must be a scalar (0-d tensor or float), got shape {tuple(a.shape)}")
        a = a.reshape(1, 1, 1).abs()
    elif q.scale_rule == "quest":
        s = quest_scale(x3.reshape(1, 1, -1) if q.granularity == "tensor" else x3, fmt)
        return (s if q.scale_mult == 1.0 else s * q.scale_mult), None
    else:
        a = absmax3(x3, q)
    return scale_from_amax(a, q, fmt, block_max=E4M3_MAX_4OVER6 if q.four_over_six else E4M3_MAX)
