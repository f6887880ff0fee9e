"""How bf16/fp16 GeMMs run on a CPU: the one owner of lowbit's CPU low-precision GeMM emulation.

A CPU without native bf16 GeMMs (AVX2) runs torch's bf16 matmul some 60x slower than fp32. The fp32 GeMM
of the upcast operands gives the same numbers a bf16 GeMM with fp32 accumulation gives (every product of
two bf16 values is exact in fp32), up to summation order, rounded once to the compute dtype at the end.
A CPU with bf16 matrix units (AMX-BF16, AVX512-BF16) runs torch's native bf16 GeMM several times faster
than fp32, with the same numbers up to summation order: there lowbit uses it. Which path a dtype takes is
decided once per process (`cpu_gemm_path`) from the CPU's capabilities alone (never from a timing: the two
paths differ in summation order, hence in bits); the environment variable LOWBIT_CPU_GEMM=native|upcast
overrides it. A checkpoint records the path, and resuming on another path is refused (`check_resumed_path`).
Everything else (CUDA, fp32/fp64 operands) runs torch's own kernel.

    linear(a, b, bias)   a·bᵀ (+ bias) in a's dtype
    mm(a, b)             a·b in a's dtype
    upcast_linear(x, w, b), UpcastLinear, upcast_cpu_linears(model): the same for plain nn.Linear layers
    under CPU bf16/fp16 autocast (lm_head, and QLinear layers that quantize nothing).
"""
from __future__ import annotations

import logging
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


def _env_path() -> str | None:
    """LOWBIT_CPU_GEMM as "native"/"upcast", None when unset or "auto"."""
    env = os.environ.get("LOWBIT_CPU_GEMM", "auto").strip().lower()
    if env not in ("auto", "native", "upcast"):
        raise ValueError(f"LOWBIT_CPU_GEMM={env!r}: use auto, native or upcast")
    return None if env == "auto" else env


@torch.compiler.assume_constant_result  # read /proc/cpuinfo eagerly, not inside a torch.compile trace
def cpu_gemm_path(dtype: torch.dtype = torch.bfloat16) -> str:
    """"native" or "upcast": how CPU GeMMs of `dtype` (bf16/fp16) run in this process. Native where the CPU has
    the flag of a matrix unit for that dtype (amx_bf16/avx512_bf16; amx_fp16/avx512_fp16), upcast elsewhere;
    LOWBIT_CPU_GEMM overrides. A pure function of the CPU and the environment: no timing decides numerics."""
    path = _PATH.get(dtype)
    if path is None:
        path = _env_path() or ("native" if cpu_flags() & set(_FLAGS[dtype]) else "upcast")
        _PATH[dtype] = path
    return path


def check_resumed_path(recorded: str | None, where: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse to continue a run whose CPU GeMMs ran on path `recorded` (from checkpoint `where`) on another path:
    the bits would differ from an uninterrupted run. An explicit LOWBIT_CPU_GEMM that differs only warns."""
    if recorded is None or recorded == cpu_gemm_path(dtype):
        return
    now = cpu_gemm_path(dtype)
    if _env_path() is not None:  # the user chose this path: continue, but say what it costs
        logging.getLogger("lowbit.train").warning(
            "resuming %s, trained with %s CPU bf16 GeMMs, on the %s path (LOWBIT_CPU_GEMM=%s): the run continues "
            "but is no longer bit for bit the uninterrupted one", where, recorded, now, now)
        return
    raise ValueError(f"checkpoint {where} was trained with {recorded} CPU bf16 GeMMs, this machine would run them "
                     f"{now} (summation order differs, so the run would not continue bit for bit); set "
                     f"LOWBIT_CPU_GEMM={recorded} to continue exactly, or LOWBIT_CPU_GEMM={now} to accept the change")


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
