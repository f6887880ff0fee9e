"""How bf16/fp16 GeMMs run on a CPU: the one owner of lowbit's CPU low-precision GeMM emulation.

A CPU without native bf16 GeMMs (AVX2) runs torch's bf16 matmul some 60x slower than fp32. The fp32 GeMM
of the upcast operands gives the same numbers a bf16 GeMM with fp32 accumulation gives (every product of
two bf16 values is exact in fp32), up to summation order, rounded once to the compute dtype at the end.
A CPU with bf16 matrix units (AMX-BF16, AVX512-BF16) runs torch's native bf16 GeMM several times faster
than fp32, with the same numbers up to summation order: there lowbit uses it. Which path a dtype takes is
decided once per process (`cpu_gemm_path`): the CPU's flags, checked by a short timing probe; the
environment variable LOWBIT_CPU_GEMM=native|upcast overrides it. Everything else (CUDA, fp32/fp64
operands) runs torch's own kernel.

    linear(a, b, bias)   a·bᵀ (+ bias) in a's dtype
    mm(a, b)             a·b in a's dtype
    upcast_linear(x, w, b), UpcastLinear, upcast_cpu_linears(model): the same for plain nn.Linear layers
    under CPU bf16/fp16 autocast (lm_head, and QLinear layers that quantize nothing).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_LOW = (torch.bfloat16, torch.float16)
_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
_PATH: dict[torch.dtype, str] = {}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _probe_native_faster(dtype: torch.dtype, n: int = 384, reps: int = 5) -> bool:
    """True unless torch's native `dtype` GeMM is slower than the fp32 GeMM of the same size (best of `reps`
    interleaved timings each, after two warm-up calls: the first bf16 call JIT-compiles oneDNN's kernel). Where the
    CPU has the units it is typically 3-7x faster, so only a CPU whose flag promises more than it delivers fails."""
    import time

    a = torch.randn(n, n)
    xs = {dt: a.to(dt) for dt in (torch.float32, dtype)}
    best = {dt: float("inf") for dt in xs}
    for x in xs.values():
        torch.mm(x, x)
        torch.mm(x, x)
    for _ in range(reps):
        for dt, x in xs.items():
            t = time.perf_counter()
            torch.mm(x, x)
            best[dt] = min(best[dt], time.perf_counter() - t)
    return best[dtype] < best[torch.float32]


def cpu_gemm_path(dtype: torch.dtype = torch.bfloat16) -> str:
    """"native" or "upcast": how CPU GeMMs of `dtype` (bf16/fp16) run in this process. Native needs the CPU
    flag of a matrix unit for that dtype and a probe not showing it slower than fp32; LOWBIT_CPU_GEMM overrides."""
    path = _PATH.get(dtype)
    if path is None:
        env = os.environ.get("LOWBIT_CPU_GEMM", "auto").strip().lower()
        if env not in ("auto", "native", "upcast"):
            raise ValueError(f"LOWBIT_CPU_GEMM={env!r}: use auto, native or upcast")
        if env == "auto":
            native = bool(cpu_flags() & set(_FLAGS[dtype])) and _probe_native_faster(dtype)
            env = "native" if native else "upcast"
        path = _PATH[dtype] = env
    return path


def emulated(t: torch.Tensor) -> bool:
    """True when a GeMM of `t` runs as the fp32 GeMM of the upcast operands: bf16/fp16 on a CPU without
    (faster) native GeMMs for that dtype."""
    return t.device.type == "cpu" and t.dtype in _LOW and cpu_gemm_path(t.dtype) == "upcast"


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
    differentiable, and some 10x faster on CPUs without bf16 units (where the CPU has them: F.linear)."""
    dev = x.device.type
    if dev != "cpu" or not torch.is_autocast_enabled(dev):
        return F.linear(x, weight, bias)
    cdtype = torch.get_autocast_dtype(dev)
    if cdtype not in _LOW or cpu_gemm_path(cdtype) == "native":
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
