"""How bf16/fp16 GeMMs run on a CPU: the one owner of lowbit's CPU low-precision GeMM emulation.

A CPU without native bf16 GeMMs (AVX2) runs torch's bf16 matmul some 60x slower than fp32. The fp32 GeMM
of the upcast operands gives the same numbers a bf16 GeMM with fp32 accumulation gives (every product of
two bf16 values is exact in fp32), up to summation order, rounded once to the compute dtype at the end.
Everything else (CUDA, fp32/fp64 operands) runs torch's own kernel.

    linear(a, b, bias)   a·bᵀ (+ bias) in a's dtype
    mm(a, b)             a·b in a's dtype
    upcast_linear(x, w, b), UpcastLinear, upcast_cpu_linears(model): the same for plain nn.Linear layers
    under CPU bf16/fp16 autocast (lm_head, and QLinear layers that quantize nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LOW = (torch.bfloat16, torch.float16)


def emulated(t: torch.Tensor) -> bool:
    """True when a GeMM of `t` runs as the fp32 GeMM of the upcast operands: bf16/fp16 on CPU."""
    return t.device.type == "cpu" and t.dtype in _LOW


def linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ (+ bias [N]) -> [M, N] in a's dtype (CPU bf16/fp16: fp32 GeMM, one rounding)."""
    if emulated(a):
        return F.linear(a.float(), b.float(), None if bias is None else bias.float()).to(a.dtype)
    return F.linear(a, b, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] · b [K, N] -> [M, N] in a's dtype (CPU bf16/fp16: in fp32, as in `linear`)."""
    if emulated(a):
        return torch.mm(a.float(), b.float()).to(a.dtype)
    return torch.mm(a, b)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), except under CPU bf16/fp16 autocast, where the operands are rounded to the
    autocast dtype and multiplied in fp32 (see `linear`): the same numbers as a native bf16 GeMM,
    differentiable, and some 10x faster on CPUs without bf16 units."""
    dev = x.device.type
    if dev != "cpu" or not torch.is_autocast_enabled(dev):
        return F.linear(x, weight, bias)
    cdtype = torch.get_autocast_dtype(dev)
    if cdtype not in _LOW:
        return F.linear(x, weight, bias)
    with torch.autocast(dev, enabled=False):
        b = None if bias is None else bias.to(cdtype)
        return linear(x.to(cdtype), weight.to(cdtype), b)


class UpcastLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose forward is upcast_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_linear(x, self.weight, self.bias)


def upcast_cpu_linears(model: nn.Module) -> nn.Module:
    """Give every plain nn.Linear left in `model` (e.g. the high-precision lm_head) the UpcastLinear forward,
    in place, so CPU bf16 autocast does not hit torch's slow bf16 GeMM. Numerics are unchanged (bf16
    operands, fp32 accumulation, bf16 output); parameters and state_dict keys are the same objects and
    names. Call after convert()."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = UpcastLinear
    return model
