"""The compiled CPU kernel of DGE's weight-gradient factor (dge.c): estimators.dge_apply in one pass, its power
by lowbit.powers' fixed operations."""
from __future__ import annotations

import ctypes
import math

import torch

from lowbit import powers
from lowbit.formats import Format
from lowbit.kernels import DTYPE_CODES, cpu_library

_POLY = (ctypes.c_float * 13)(*powers.LOG2_POLY, *powers.EXP2_POLY)


def dge_apply(dw: torch.Tensor, ws: torch.Tensor, fmt: Format, k: float, clamp: float) -> torch.Tensor | None:
    """dw.float() · estimators.dge_derivative(ws, fmt, k, clamp) (fp32 [R, C]); None where the kernel does not
    apply. dw [R, C] contiguous (fp32/bf16/fp16); ws fp32, contiguous or a transposed view of a contiguous
    tensor."""
    lib = cpu_library()
    if (torch.compiler.is_compiling() or lib is None or dw.device.type != "cpu" or dw.dim() != 2
            or dw.dtype not in DTYPE_CODES or not dw.is_contiguous() or ws.dtype != torch.float32
            or ws.shape != dw.shape):
        return None
    R, C = dw.shape
    if not (ws.is_contiguous() or (ws.t().is_contiguous() and R > 1)):
        return None
    e = 1.0 / k - 1.0
    zero_pow = math.inf if e < 0 else 1.0 if e == 0 else 0.0
    out = torch.empty((R, C), dtype=torch.float32)
    lib.lb_dge_apply(ws.data_ptr(), ws.stride(0), ws.stride(1), dw.data_ptr(), DTYPE_CODES[dw.dtype], R, C,
                     fmt.min_normal, 2.0 ** -fmt.mbits, e, k, clamp, fmt.max, _POLY, zero_pow, out.data_ptr(),
                     torch.get_num_threads())
    return out
