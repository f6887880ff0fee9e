"""The compiled CPU kernels of OCC (occ.c): per-token clamping with its residual, dense or as sparse rows, and the
residual's two products. lowbit.estimators.occ_clamp_rows and lowbit.nn.residual hold the eager specification."""
from __future__ import annotations

import torch

from lowbit.kernels import DTYPE_CODES, cpu_library


def _applies(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in DTYPE_CODES


def _lib_for(*ts: torch.Tensor):
    """The library if every tensor is a contiguous 2-D CPU tensor of a kernel dtype (else None: eager)."""
    ok = all(_applies(t) and t.dim() == 2 and t.is_contiguous() for t in ts)
    return cpu_library() if ok else None


def occ_rows(x: torch.Tensor, i_lo: int, i_hi: int, cap: int | None = None):
    """estimators.occ_clamp_rows for a contiguous CPU x [M, K] in one pass (per-row order statistics by
    quickselect, clamp, residual): (xc, residual, lo [M, 1], hi [M, 1]) with the residual dense ([M, K], x's
    dtype); with `cap`, the residual's nonzeros as rows instead (vals fp32 [M, cap], cols int64 [M, cap], cnt
    int64 [M]; nn.residual.SparseRows' fields) in place of the dense residual. None where the kernel does not
    apply, or (with cap) where a row has more than cap nonzeros (rows with NaN or infinities). The same values;
    only the sign of a zero bound or clamped zero may differ (torch's own vectorised and scalar maximum disagree
    there too), which no quantizer sees (zeros quantize to +0)."""
    lib = _lib_for(x)
    if lib is None:
        return None
    M, K = x.shape
    xc = torch.empty_like(x)
    lo, hi = torch.empty((M, 1), dtype=x.dtype), torch.empty((M, 1), dtype=x.dtype)
    if cap is None:
        res, rows, ptrs = torch.empty_like(x), None, (None, None, None)
    else:
        res = None
        rows = (torch.empty((M, cap), dtype=torch.float32), torch.empty((M, cap), dtype=torch.int64),
                torch.empty(M, dtype=torch.int64))
        ptrs = tuple(t.data_ptr() for t in rows)
    failed = lib.lb_occ_rows(x.data_ptr(), DTYPE_CODES[x.dtype], M, K, i_lo, i_hi, xc.data_ptr(),
                             None if res is None else res.data_ptr(), lo.data_ptr(), hi.data_ptr(), *ptrs,
                             cap or 0, torch.get_num_threads())
    if failed == 1:
        raise MemoryError("lowbit's OCC kernel could not allocate its work buffers")
    if failed:
        return None
    return (xc, res, lo, hi) if cap is None else (xc, rows, lo, hi)


def ell_mm(vals: torch.Tensor, cols: torch.Tensor, cnt: torch.Tensor, w: torch.Tensor,
           y: torch.Tensor | None = None) -> torch.Tensor | None:
    """nn.residual.mm_reference's ΔX·Wᵀ (fp32 [M, N]) for ΔX's rows (vals fp32 [M, c], cols, cnt) and w [N, K]
    (contiguous, fp32/bf16/fp16); with y ([M, N] contiguous, fp32/bf16/fp16): y += that product rounded to y's
    dtype, in place (returns y). None where the kernel does not apply (nothing written)."""
    lib = _lib_for(vals, w)
    (M, c), (N, K) = vals.shape, w.shape
    if lib is None or vals.dtype != torch.float32 or (y is not None and (
            y.device.type != "cpu" or y.dtype not in DTYPE_CODES or not y.is_contiguous() or y.shape != (M, N))):
        return None
    out = torch.empty((M, N), dtype=torch.float32) if y is None else None
    if lib.lb_ell_mm(vals.data_ptr(), cols.data_ptr(), cnt.data_ptr(), M, c, w.data_ptr(), DTYPE_CODES[w.dtype],
                     N, K, None if out is None else out.data_ptr(), None if y is None else y.data_ptr(),
                     DTYPE_CODES[y.dtype] if y is not None else 0, torch.get_num_threads()):
        raise MemoryError("lowbit's OCC kernel could not allocate its work buffers")
    return out if y is None else y


def ell_tmm(dy: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor, cnt: torch.Tensor, K: int
            ) -> torch.Tensor | None:
    """nn.residual.tmm_reference's dyᵀ·ΔX (fp32 [N, K], contiguous) for dy [M, N] (contiguous, fp32/bf16/fp16)
    and ΔX's rows; None where the kernel does not apply."""
    lib = _lib_for(vals, dy)
    if lib is None or vals.dtype != torch.float32:
        return None
    M, N = dy.shape
    out = torch.empty((N, K), dtype=torch.float32)
    if lib.lb_ell_tmm(vals.data_ptr(), cols.data_ptr(), cnt.data_ptr(), M, vals.shape[1], dy.data_ptr(),
                      DTYPE_CODES[dy.dtype], N, K, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("lowbit's OCC kernel could not allocate its work buffers")
    return out
