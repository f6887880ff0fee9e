"""The compiled CPU kernel of DGE's weight-gradient factor (dge.c): estimators.dge_apply in one pass, its power
by lowbit.powers' fixed operations; optionally with OCC's compensation added to dW first and the weight divided
by its scales on the fly (the weight-gradient epilogue of nn.function)."""
from __future__ import annotations

import ctypes
import math

import torch

from lowbit import powers
from lowbit.formats import Format
from lowbit.kernels import DTYPE_CODES, cpu_library

_POLY = (ctypes.c_float * 13)(*powers.LOG2_POLY, *powers.EXP2_POLY)


def _ok(dw: torch.Tensor, lib) -> bool:
    return (lib is not None and dw.device.type == "cpu" and dw.dim() == 2 and dw.dtype in DTYPE_CODES
            and dw.is_contiguous())


def _call(lib, src, sdt, s0, s1, scales, rs, recip, add, dw, fmt: Format, k: float, clamp: float) -> torch.Tensor:
    R, C = dw.shape
    e = 1.0 / k - 1.0
    zero_pow = math.inf if e < 0 else 1.0 if e == 0 else 0.0
    out = torch.empty((R, C), dtype=torch.float32)
    lib.lb_dge_apply(src, sdt, s0, s1, scales, rs, recip, None if add is None else add.data_ptr(), dw.data_ptr(),
                     DTYPE_CODES[dw.dtype], R, C, fmt.min_normal, 2.0 ** -fmt.mbits, e, k, clamp, fmt.max, _POLY,
                     zero_pow, out.data_ptr(), torch.get_num_threads())
    return out


def dge_apply(dw: torch.Tensor, ws: torch.Tensor, fmt: Format, k: float, clamp: float) -> torch.Tensor | None:
    """dw.float() · estimators.dge_derivative(ws, fmt, k, clamp) (fp32 [R, C]); None where the kernel does not
    apply. dw [R, C] contiguous (fp32/bf16/fp16); ws fp32, contiguous or a transposed view of a contiguous
    tensor."""
    lib = cpu_library()  # (None while dynamo traces)
    if not _ok(dw, lib) or ws.dtype != torch.float32 or ws.shape != dw.shape:
        return None
    if not (ws.is_contiguous() or (ws.t().is_contiguous() and dw.shape[0] > 1)):
        return None
    return _call(lib, ws.data_ptr(), DTYPE_CODES[torch.float32], ws.stride(0), ws.stride(1), None, 0, 0, None, dw,
                 fmt, k, clamp)


def dge_epilogue(dw: torch.Tensor, add: torch.Tensor | None, w: torch.Tensor, scales: torch.Tensor,
                 factors: torch.Tensor | None, fmt: Format, k: float, clamp: float) -> torch.Tensor | None:
    """(dw.float() + add) · dge_derivative(w / scales) (or w · factors where the rule multiplies), fp32 [R, C], in
    one pass; None where the kernel does not apply. dw, w [R, C] contiguous; add fp32 [R, C] contiguous or None;
    scales / factors fp32 with one value per row ([R, 1, 1]) or for the whole tensor ([1, 1, 1]):
    quant.scale_factors of a row- or tensor-granular quantizer."""
    lib = cpu_library()
    sc = scales if factors is None else factors
    if (not _ok(dw, lib) or not _ok(w, lib) or w.shape != dw.shape or sc.dtype != torch.float32
            or sc.numel() not in (1, dw.shape[0]) or (sc.dim() == 3 and sc.shape[1] != 1)
            or (add is not None and (add.dtype != torch.float32 or add.shape != dw.shape
                                     or not add.is_contiguous()))):
        return None
    sc = sc.contiguous()
    return _call(lib, w.data_ptr(), DTYPE_CODES[w.dtype], w.stride(0), 1, sc.data_ptr(), sc.numel(),
                 int(factors is not None), add, dw, fmt, k, clamp)
