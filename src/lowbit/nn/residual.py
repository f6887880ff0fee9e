"""OCC's clamp and its residual ΔX = X − clamp(X), with the residual's two products: ΔX·Wᵀ, added to the
forward's output, and dYᵀ·ΔX, added to the weight gradient.

ΔX is nonzero on about 2·(1−α) of its entries. On CPU it is kept as sparse rows (`SparseRows`, the ELLPACK
layout: each row's nonzeros in ascending column order, padded to a common width), and every entry of a product
sums its few terms in one fixed order: from +0, in fp32 (fp64 for fp64 operands), each product rounded before
it is added; an output row of ΔX·Wᵀ takes its row's terms in column order, an entry of dYᵀ·ΔX its column's in
token order. `mm_reference` and `tmm_reference` spell that order out in torch and are the specification; the
compiled kernels (lowbit.kernels.occ) follow it bit for bit. Per token, the OCC kernel writes the sparse rows
while it clamps, so the dense residual never exists. Under torch.compile on CPU the same kernels run as opaque ops
(lowbit::occ_sparse, ell_mm, ell_tmm) on rows of a fixed width (the most a finite row can have). On GPUs (and for
OCC over the whole tensor under torch.compile) ΔX stays dense and the products are dense GeMMs: the same sums up
to their order.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from lowbit import cpu_bf16
from lowbit.estimators import occ_clamp, occ_clamp_rows, occ_row_ranks
from lowbit.kernels import occ as occ_kernels

MAX_DENSITY = 0.25  # a residual with a row denser than this stays dense (a GeMM is then as cheap)


class SparseRows(NamedTuple):
    """ΔX [M, K] by rows: row i's nonzeros are vals[i, :cnt[i]] at columns cols[i, :cnt[i]] (ascending); the
    slots past cnt[i] hold 0 at column 0."""
    vals: torch.Tensor  # [M, c] fp32 (fp64 for an fp64 ΔX)
    cols: torch.Tensor  # [M, c] int64
    cnt: torch.Tensor  # [M] int64
    K: int

    def valid(self) -> torch.Tensor:
        """bool [M, c]: which slots hold a nonzero."""
        return torch.arange(self.vals.shape[1], device=self.cnt.device) < self.cnt[:, None]

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔX as a dense [M, K] tensor (vals' dtype unless given)."""
        M, v = self.cnt.shape[0], self.valid()
        flat = torch.zeros(M * self.K, dtype=self.vals.dtype, device=self.vals.device)
        rows = torch.arange(M, device=self.cols.device)[:, None] * self.K
        flat[(rows + self.cols)[v]] = self.vals[v]
        return flat.view(M, self.K).to(dtype or self.vals.dtype)


def from_dense(res: torch.Tensor, max_density: float = MAX_DENSITY) -> SparseRows | None:
    """res [M, K]'s nonzeros (NaN included, ±0 not) as SparseRows (fp32 values, fp64 for fp64 res), or None when
    a row has more than max_density·K of them."""
    M, K = res.shape
    nz = res != 0
    cnt = nz.sum(1)
    c = int(cnt.max()) if M else 0
    if c > max_density * K:
        return None
    cols = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :c]  # nonzero columns first, ascending
    pad = torch.arange(c, device=res.device) >= cnt[:, None]
    vals = res.gather(1, cols).to(torch.promote_types(res.dtype, torch.float32)).masked_fill(pad, 0.0)
    return SparseRows(vals, cols.masked_fill(pad, 0), cnt, K)


def clamp(x: torch.Tensor, alpha: float, granularity: str, sparse: bool):
    """OCC on x [M, K]: (clamped x, ΔX, lo, hi) as lowbit.estimators' occ_clamp_rows ("token") or occ_clamp
    ("tensor") give them, ΔX as SparseRows where `sparse` and it is sparse enough, else dense. Under
    torch.compile per token through the opaque op lowbit::occ_sparse (rows of a fixed width), else dense."""
    compiling = torch.compiler.is_compiling()
    if sparse and granularity == "token":
        K = x.shape[1]
        i_lo, i_hi = occ_row_ranks(K, alpha)
        cap = i_lo + K - 1 - i_hi  # entries strictly beyond the bounds, in a row of finite values
        if compiling and _OPS and cap <= MAX_DENSITY * K:
            xc, vals, cols, cnt, lo, hi = _OPS["occ"](x, alpha, cap)
            return xc, SparseRows(vals, cols, cnt, K), lo, hi
        fused = occ_kernels.occ_rows(x, i_lo, i_hi, cap) if cap <= MAX_DENSITY * K else None
        if fused is not None:  # (None as well for a row with NaN or infinities: the eager route below)
            xc, (vals, cols, cnt), lo, hi = fused
            return xc, SparseRows(vals, cols, cnt, K), lo, hi
    xc, res, lo, hi = (occ_clamp_rows if granularity == "token" else occ_clamp)(x, alpha)
    rows = from_dense(res) if sparse and not compiling else None  # (a data-dependent width breaks a graph)
    return xc, res if rows is None else rows, lo, hi


def density(res: torch.Tensor | SparseRows) -> torch.Tensor:
    """The share of ΔX's entries that are nonzero (0-d fp32)."""
    if isinstance(res, SparseRows):
        return res.cnt.sum().float() / max(res.cnt.numel() * res.K, 1)
    return (res != 0).float().mean()


def mm_reference(r: SparseRows, w: torch.Tensor) -> torch.Tensor:
    """ΔX·Wᵀ [M, N] in vals' dtype for w [N, K]: out[i] = Σ_j vals[i, j]·w[:, cols[i, j]] over j in order."""
    wt = w.to(r.vals.dtype).t()
    out = torch.zeros((r.vals.shape[0], w.shape[0]), dtype=r.vals.dtype, device=w.device)
    pad = ~r.valid()
    for j in range(r.vals.shape[1]):
        out += (r.vals[:, j, None] * wt[r.cols[:, j]]).masked_fill_(pad[:, j, None], 0.0)
    return out


def tmm_reference(dy: torch.Tensor, r: SparseRows) -> torch.Tensor:
    """dyᵀ·ΔX [N, K] in vals' dtype for dy [M, N]: entry (n, k) sums ΔX[i, k]·dy[i, n] over tokens i in order
    (index_add_ on CPU adds its rows one after another, in index order)."""
    v = r.valid()
    rows = torch.arange(v.shape[0], device=dy.device)[:, None].expand_as(v)[v]  # token of each nonzero, ascending
    terms = r.vals[v][:, None] * dy.to(r.vals.dtype)[rows]
    out = torch.zeros((r.K, dy.shape[1]), dtype=r.vals.dtype, device=dy.device)
    return out.index_add_(0, r.cols[v], terms).t()


def mm(res: torch.Tensor | SparseRows, w: torch.Tensor) -> torch.Tensor:
    """ΔX·Wᵀ for ΔX [M, K] and w [N, K] in the compute dtype: sparse rows in fp32 (the kernel where it applies),
    a dense ΔX as a GeMM in the compute dtype."""
    if isinstance(res, SparseRows):
        if torch.compiler.is_compiling() and _OPS:
            return _OPS["mm"](res.vals, res.cols, res.cnt, w)
        fused = occ_kernels.ell_mm(res.vals, res.cols, res.cnt, w.contiguous())
        return fused if fused is not None else mm_reference(res, w)
    return cpu_bf16.linear(res, w)


def add_mm(y: torch.Tensor, res: torch.Tensor | SparseRows, w: torch.Tensor) -> torch.Tensor:
    """y += mm(res, w).to(y.dtype), in place (returns y): on CPU one kernel pass for sparse rows (the fp32
    product and its cast never stored; the same bits), elsewhere those two steps."""
    if (isinstance(res, SparseRows) and not torch.compiler.is_compiling()
            and occ_kernels.ell_mm(res.vals, res.cols, res.cnt, w.contiguous(), y=y) is not None):
        return y
    return y.add_(mm(res, w).to(y.dtype))


def tmm(dy: torch.Tensor, res: torch.Tensor | SparseRows) -> torch.Tensor:
    """dyᵀ·ΔX [N, K] for dy [M, N] and ΔX [M, K], as `mm`."""
    if isinstance(res, SparseRows):
        if torch.compiler.is_compiling() and _OPS:
            return _OPS["tmm"](dy, res.vals, res.cols, res.cnt, res.K)
        fused = occ_kernels.ell_tmm(dy.contiguous(), res.vals, res.cols, res.cnt, res.K)
        return fused if fused is not None else tmm_reference(dy, res)
    return cpu_bf16.mm(dy.t(), res)


# --- opaque ops for torch.compile: the kernels (or the references) with fixed-width rows --------------------

def _capped_rows(res: torch.Tensor, cap: int):
    """from_dense's fields for res [M, K] with exactly cap slots per row: a row with more nonzeros (only rows
    with NaN or ±inf can have them; their products are NaN either way) keeps its first cap."""
    nz = res != 0
    cnt = nz.sum(1).clamp_max(cap)
    cols = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :cap]
    pad = torch.arange(cap, device=res.device) >= cnt[:, None]
    vals = res.gather(1, cols).to(torch.promote_types(res.dtype, torch.float32)).masked_fill(pad, 0.0)
    return vals, cols.masked_fill(pad, 0), cnt


def _occ_impl(x: torch.Tensor, alpha: float, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    i_lo, i_hi = occ_row_ranks(x.shape[1], alpha)
    fused = occ_kernels.occ_rows(x.contiguous(), i_lo, i_hi, cap)
    if fused is not None:
        xc, (vals, cols, cnt), lo, hi = fused
    else:
        xc, res, lo, hi = occ_clamp_rows(x, alpha)
        vals, cols, cnt = _capped_rows(res, cap)
    return xc, vals, cols, cnt, lo, hi


def _occ_fake(x, alpha, cap):
    M = x.shape[0]
    vdt = torch.promote_types(x.dtype, torch.float32)
    return (torch.empty_like(x), x.new_empty((M, cap), dtype=vdt), x.new_empty((M, cap), dtype=torch.int64),
            x.new_empty((M,), dtype=torch.int64), x.new_empty((M, 1)), x.new_empty((M, 1)))


def _mm_impl(vals: torch.Tensor, cols: torch.Tensor, cnt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    fused = occ_kernels.ell_mm(vals, cols, cnt, w.contiguous())
    return fused if fused is not None else mm_reference(SparseRows(vals, cols, cnt, w.shape[1]), w)


def _tmm_impl(dy: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor, cnt: torch.Tensor, K: int) -> torch.Tensor:
    fused = occ_kernels.ell_tmm(dy.contiguous(), vals, cols, cnt, K)
    return fused if fused is not None else tmm_reference(dy, SparseRows(vals, cols, cnt, K)).contiguous()


def _register() -> dict:
    """lowbit::occ_sparse, lowbit::ell_mm, lowbit::ell_tmm, or {} (one warning) where this torch's custom_op
    cannot take them: compiled code then keeps ΔX dense."""
    try:
        ops = {"occ": torch.library.custom_op("lowbit::occ_sparse", mutates_args=())(_occ_impl),
               "mm": torch.library.custom_op("lowbit::ell_mm", mutates_args=())(_mm_impl),
               "tmm": torch.library.custom_op("lowbit::ell_tmm", mutates_args=())(_tmm_impl)}
        ops["occ"].register_fake(_occ_fake)
        ops["mm"].register_fake(lambda vals, cols, cnt, w: vals.new_empty((vals.shape[0], w.shape[0])))
        ops["tmm"].register_fake(lambda dy, vals, cols, cnt, K: vals.new_empty((dy.shape[1], K)))
        return ops
    except Exception as e:  # noqa: BLE001 -- a torch whose custom_op cannot take these signatures
        logging.getLogger("lowbit").warning("torch.compile will keep OCC's residual dense (%s)", e)
        return {}


_OPS = _register()
