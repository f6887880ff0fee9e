"""The autograd Function of a quantized linear layer: Y = X·Wᵀ with the spec's quantized GeMMs.

It receives tensors, the frozen LinearSpec and the layer's LayerQuantState, and never changes that state: it
reads the amax histories and the rotation, draws from the random stream the layer gave this call (saved with
the call for its backward), and reports what it observed (operand amaxes, statistics) for the layer to commit
(lowbit.nn.state). Unlike torchao's Float8Linear the bias is an input of the Function: it is added in the GeMM's
accumulator before the one rounding to the compute dtype, as a bf16 GeMM's epilogue does (added outside, a bf16
output would be rounded twice).

  * DGE (spec.dge.enabled): dW ← dW ⊙ f'(W_scaled), f' from `lowbit.estimators.dge_derivative` on the
    forward weight divided by its scale (the same scale the forward GeMM used).
  * OCC (spec.occ_on): X is clamped to its [1−α, α] quantiles (per token, or over the tensor) before quantizing; with `compensate` the
    residual product ΔX·Wᵀ is added to Y, from ΔX and W in the compute dtype (not quantized) with fp32
    accumulation (sparse CSR on CPU; dense elsewhere). The weight-gradient GeMM uses the *same* clamped
    activation (quantized along tokens) plus the matching compensation dYᵀ·ΔX, so dW is the exact gradient
    of the compensated forward (the paper's reference code likewise reuses its compensated forward
    activation in the dW GeMM). dX is the straight-through Q(dY)·Q(W).
  * Hadamard (spec.hadamard_size): a ±1-signed block-Hadamard rotation R (R·Rᵀ = I) along the token dim
    of both dW operands, dYᵀR and XᵀR, before quantizing them.
  * compute dtype `cdtype`: operands are cast to it before quantizing and every GeMM runs in it (CPU bf16/fp16:
    as fp32 GeMMs of the upcast operands, lowbit.cpu_bf16); with gemm="exact" the GeMMs run in fp32
    (`gemm_dtype`) on operands rounded to cdtype first.
"""
from __future__ import annotations

import warnings

import torch

from lowbit import cpu_bf16, kernels
from lowbit.estimators import dge_apply, occ_clamp, occ_clamp_rows
from lowbit.nn.hadamard import rotate
from lowbit.nn.spec import LinearSpec, fake_quantize_2d, scaled_values_2d
from lowbit.nn.state import LayerQuantState
from lowbit.nn.stats import record_operand

_SPARSE_MAX_DENSITY = 0.25  # CPU: below this density the OCC residual product uses CSR


def quantize_operand(t: torch.Tensor, spec: LinearSpec, op: str, state: LayerQuantState, generator=None, amax=None,
                     record: bool = True, q=None, gemm: str = "fprop") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fake-quantized 2-D t along its last dim, the amax used or None) for operand `op` ("input", "weight",
    "grad_output"). Delayed scaling reads the operand's amax history (and, with `record`, reports t's amax);
    statistics go to the layer's observer when it collects (a requantization of the same operand for another
    GeMM reports under that GeMM). q: a quantizer other than the spec's for `op` (dgrad_weight); generator:
    this call's random stream, for stochastic rounding."""
    q = getattr(spec, op) if q is None else q
    if q is None:
        return t, None
    if amax is None and spec.delayed:
        amax = state.delayed_amax(op, t, record)
    gen = generator if q.rounding == "stochastic" else None
    observer = state.observer
    if observer is None:
        return fake_quantize_2d(t, q, gen, amax), amax
    out, scales = fake_quantize_2d(t, q, gen, amax, with_scales=True)
    record_operand(observer, gemm, op, t, out, q, amax, scales)
    return out, amax


def _csr(r: torch.Tensor) -> torch.Tensor | None:
    """r as a CSR tensor (fp32 values, fp64 for fp64 r) if at most _SPARSE_MAX_DENSITY of it is nonzero, else
    None."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        s = kernels.dense_to_csr(r, _SPARSE_MAX_DENSITY)  # CPU: counted and filled in two passes
        if s is None:
            s = r.to(torch.promote_types(r.dtype, torch.float32)).to_sparse_csr()
            s = s if s.values().numel() <= _SPARSE_MAX_DENSITY * r.numel() else False
    return s if s is not False else None


def _sparse_ok(res: torch.Tensor) -> bool:
    # accelerators: a data-dependent sparse layout would cost a sync; under torch.compile it breaks the graph
    return res.device.type == "cpu" and not torch.compiler.is_compiling()


def residual_mm(res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """res [M, K] · wᵀ [K, N], both in the compute dtype, accumulated in fp32 (or fp64): the OCC
    compensation. On CPU the sparse residual goes through CSR in fp32 (exact products of the bf16
    operands; about 6x faster than a dense GeMM at 2% density); elsewhere a dense GeMM."""
    if _sparse_ok(res):
        dt = torch.promote_types(res.dtype, torch.float32)
        s = _csr(res)
        if s is not None:
            return s @ w.to(dt).t()
    return cpu_bf16.linear(res, w)


def residual_tmm(dy: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """dyᵀ [N, M] · res [M, K] (the OCC compensation of dW), as residual_mm."""
    if _sparse_ok(res):
        dt = torch.promote_types(res.dtype, torch.float32)
        s = _csr(res)
        if s is not None:
            return (s.t() @ dy.to(dt)).t()
    return cpu_bf16.mm(dy.t(), res)


class QLinearFunction(torch.autograd.Function):
    """x2 [M, K] (any float dtype), weight [N, K], bias [N] or None, spec, state, cdtype -> Y [M, N] in cdtype."""

    @staticmethod
    def forward(ctx, x2, weight, bias, spec: LinearSpec, state: LayerQuantState, cdtype):
        # gemm="exact": operands rounded to the compute dtype (as autocast gives them), then quantized and
        # multiplied in fp32 -- the dequantized values are not rounded to bf16 again; the output is, once
        low = cdtype in (torch.bfloat16, torch.float16)
        gemm_dtype = torch.float32 if spec.exact_gemm and low else cdtype
        x, w = x2.to(cdtype).to(gemm_dtype), weight.to(cdtype).to(gemm_dtype)
        (gen, _), observer = state.streams(state.call_index), state.observer
        xc, res, lo, hi = _occ(x, spec, observer)
        xq, _ = quantize_operand(xc, spec, "input", state, gen)
        if spec.weight_in_axis:  # once along N (per input channel); dX reuses it
            wq_t, w_amax = quantize_operand(w.t(), spec, "weight", state, gen)
            wq = wq_t.t()
        else:
            wq, w_amax = quantize_operand(w, spec, "weight", state, gen)
        y = cpu_bf16.linear(xq, wq, None if bias is None else bias.to(cdtype).to(gemm_dtype))
        if res is not None and spec.occ.compensate:
            comp = residual_mm(res, w).to(gemm_dtype)
            y += comp
            if observer is not None:
                observer.record("fprop", "input", {"occ_residual_share": comp.float().norm() /
                                                   y.float().norm().clamp_min(1e-30)})
        ctx.spec, ctx.state, ctx.call, ctx.w_amax, ctx.x_dtype = spec, state, state.call_index, w_amax, x2.dtype
        ctx.cdtype, ctx.gemm_dtype = cdtype, gemm_dtype
        ctx.occ, ctx.bias_dtype = lo is not None, None if bias is None else bias.dtype
        keep_x = not spec.reuse_xq or ctx.occ or spec.wgrad_hp  # to requantize along tokens, rebuild ΔX, or dW
        ctx.save_for_backward(x if keep_x else None, weight, xq if spec.reuse_xq else None,
                              wq if spec.reuse_wq else None, lo, hi)
        return y.to(cdtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, xq_saved, wq_saved, lo, hi = ctx.saved_tensors
        spec, state, gemm_dtype = ctx.spec, ctx.state, ctx.gemm_dtype
        gen = state.streams(ctx.call)[1]
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(ctx.cdtype).to(gemm_dtype).contiguous()
            dyq = None
            if need_dx or (need_dw and spec.reuse_dyq):
                dyq, _ = quantize_operand(dy, spec, "grad_output", state, gen, gemm="dgrad")  # along N
            if need_dx:
                wq = wq_saved
                if wq is None:  # W quantized per input channel: along N, i.e. rows of Wᵀ
                    wt = weight.to(ctx.cdtype).to(gemm_dtype).t()
                    wq = quantize_operand(wt, spec, "weight", state, gen, amax=ctx.w_amax, record=False,
                                          q=spec.dgrad_weight, gemm="dgrad")[0].t()
                dx = cpu_bf16.mm(dyq, wq).to(ctx.x_dtype)
            if need_dw:
                xc, res = _clamped(x, lo, hi, spec) if ctx.occ else (x, None)
                dw = weight_grad(spec, state, gen, xc, res, dy, dyq, xq_saved)
                if spec.dge.enabled:  # f' on W divided by the very scales the forward used
                    wc = weight.to(ctx.cdtype).to(gemm_dtype)
                    ws = scaled_values_2d(wc.t().contiguous(), spec.weight, amax=ctx.w_amax).t() \
                        if spec.weight_in_axis else scaled_values_2d(wc, spec.weight, amax=ctx.w_amax)
                    dw = dge_apply(dw, ws, spec.weight.fmt, spec.dge.k, spec.dge.clamp)
                dw = dw.to(weight.dtype)
            if need_db and ctx.bias_dtype is not None:
                db = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def _occ(x, spec: LinearSpec, observer):
    """OCC's (clamped x, residual ΔX, lower, upper bounds); (x, None, None, None) when OCC is off."""
    if not (spec.occ_on and x.numel()):
        return x, None, None, None
    clamp = occ_clamp_rows if spec.occ.granularity == "token" else occ_clamp
    xc, res, lo, hi = clamp(x, spec.occ.alpha)
    if observer is not None:
        observer.record("fprop", "input", {"occ_clamped": (res != 0).float().mean()})
    return xc, res, lo, hi


def _clamped(x, lo, hi, spec: LinearSpec):
    """(the OCC-clamped activation the forward quantized, its residual ΔX or None without compensation)."""
    xc = torch.clamp(x, lo, hi)
    return xc, (x - xc if spec.occ.compensate else None)


def weight_grad(spec: LinearSpec, state: LayerQuantState, gen, xc, res, dy, dyq, xq_saved) -> torch.Tensor:
    """dW [N, K] = Q(dYᵀ)·Q(Xcᵀ)ᵀ (+ dYᵀ·ΔX, fp32 accumulation), Xc the (clamped) activation [M, K].
    xc is None when xq_saved (Q(X), reusable as Q(Xᵀ)ᵀ) is given and OCC is off."""
    if spec.wgrad_hp:  # unquantized operands; (x - xc) + xc = x, so OCC's compensation is already in it
        return cpu_bf16.mm(dy.t(), xc if res is None else xc + res)
    if spec.hadamard_size:
        pad = (-xc.shape[0]) % spec.pad_multiple()
        H, s = state.hadamard_rotation, state.hadamard_signs
        dyt = rotate(dy.t(), H, s, pad, dy.dtype)
        xt = rotate(xc.t(), H, s, pad, xc.dtype)
        gq, _ = quantize_operand(dyt, spec, "grad_output", state, gen, record=False, gemm="wgrad")
        xq, _ = quantize_operand(xt, spec, "input", state, gen, record=False, gemm="wgrad")
        dw = cpu_bf16.mm(gq, xq.t())
    else:
        if dyq is not None and spec.reuse_dyq:
            gq = dyq.t()
        else:
            gq, _ = quantize_operand(dy.t(), spec, "grad_output", state, gen, record=False,
                                     gemm="wgrad")
        xq = xq_saved
        if xq is None:
            xq = quantize_operand(xc.t(), spec, "input", state, gen, record=False, gemm="wgrad")[0].t()
        dw = cpu_bf16.mm(gq, xq)
    if res is not None:
        comp = residual_tmm(dy, res)
        dw = dw.to(torch.promote_types(comp.dtype, torch.float32)) + comp
    return dw
