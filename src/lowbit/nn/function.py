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
    accumulation (sparse rows on CPU, lowbit.nn.residual; dense elsewhere). The weight-gradient GeMM uses the *same* clamped
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

import logging

import torch

from lowbit import cpu_bf16
from lowbit.estimators import dge_apply
from lowbit.formats import get_format
from lowbit.kernels import dge as dge_kernels
from lowbit.nn import residual
from lowbit.nn.hadamard import rotate
from lowbit.nn.spec import LinearSpec, fake_quantize_2d, scaled_values_2d
from lowbit.nn.state import LayerQuantState
from lowbit.nn.stats import record_operand
from lowbit.quant import scale_factors


def quantize_operand(t: torch.Tensor, spec: LinearSpec, op: str, state: LayerQuantState, generator=None, amax=None,
                     record: bool = True, q=None, gemm: str = "fprop", transposed: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fake-quantized 2-D t along its last dim, the amax used or None) for operand `op` ("input", "weight",
    "grad_output"). Delayed scaling reads the operand's amax history (and, with `record`, reports t's amax);
    statistics go to the layer's observer when it collects (a requantization of the same operand for another
    GeMM reports under that GeMM). q: a quantizer other than the spec's for `op` (dgrad_weight); generator:
    this call's random stream, for stochastic rounding. transposed: t stands for the operand t.t() (quantized
    along t's columns) and the values come back in t's layout."""
    q = getattr(spec, op) if q is None else q
    if q is None:
        return t, None
    if amax is None and spec.delayed:
        amax = state.delayed_amax(op, t, record)
    gen = generator if q.rounding == "stochastic" else None
    observer = state.observer
    if observer is None:
        return fake_quantize_2d(t, q, gen, amax, transposed=transposed), amax
    out, scales = fake_quantize_2d(t, q, gen, amax, with_scales=True, transposed=transposed)
    record_operand(observer, gemm, op, t.t() if transposed else t, out.t() if transposed else out, q, amax, scales)
    return out, amax


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
            wq, w_amax = quantize_operand(w, spec, "weight", state, gen, transposed=True)
        else:
            wq, w_amax = quantize_operand(w, spec, "weight", state, gen)
        y = cpu_bf16.linear(xq, wq, None if bias is None else bias.to(cdtype).to(gemm_dtype))
        if res is not None and spec.occ.compensate and observer is None:
            residual.add_mm(y, res, w)
        elif res is not None and spec.occ.compensate:  # a statistics step: the compensation's share of Y
            comp = residual.mm(res, w).to(gemm_dtype)
            y += comp
            observer.record("fprop", "input", {"occ_residual_share": comp.float().norm() /
                                               y.float().norm().clamp_min(1e-30)})
        ctx.spec, ctx.state, ctx.call, ctx.w_amax, ctx.x_dtype = spec, state, state.call_index, w_amax, x2.dtype
        ctx.cdtype, ctx.gemm_dtype = cdtype, gemm_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        keep_x = not spec.reuse_xq or lo is not None or spec.wgrad_hp  # to requantize along tokens, ΔX, or dW
        # OCC: sparse rows keep the clamped x and ΔX (its rows: ~12% of a bf16 x at α = 0.99, int64 columns);
        # a dense ΔX is rebuilt from x, lo, hi
        ctx.occ = None if lo is None else "sparse" if isinstance(res, residual.SparseRows) else "dense"
        occ_saved = (None, None, None) if lo is None else res[:3] if ctx.occ == "sparse" else (lo, hi, None)
        ctx.occ_k = x.shape[1]
        # the compute-dtype weight for dX's requantization and DGE (the cast once, as autocast's linear keeps it)
        keep_w = not spec.reuse_wq or spec.dge.enabled
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(xc if ctx.occ == "sparse" else x if keep_x else None, w if keep_w else None,
                              xq if spec.reuse_xq else None, wq if spec.reuse_wq else None, *occ_saved)
        return y.to(cdtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, xq_saved, wq_saved, *occ_saved = ctx.saved_tensors
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
                    wq = quantize_operand(w, spec, "weight", state, gen,
                                          amax=ctx.w_amax, record=False, q=spec.dgrad_weight, gemm="dgrad",
                                          transposed=True)[0]
                dx = cpu_bf16.mm(dyq, wq).to(ctx.x_dtype)
            if need_dw:
                xc, res = _occ_backward(x, occ_saved, ctx, spec)
                dw, comp = weight_grad(spec, state, gen, xc, res, dy, dyq, xq_saved)
                dw = _dge(dw, comp, w, ctx, spec) if spec.dge.enabled else _plus(dw, comp)
                dw = dw.to(ctx.w_dtype)
            if need_db and ctx.bias_dtype is not None:
                db = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def _occ(x, spec: LinearSpec, observer):
    """OCC's (clamped x, residual ΔX (nn.residual: sparse rows on CPU), lower, upper bounds); (x, None, None,
    None) when OCC is off."""
    if not (spec.occ_on and x.numel()):
        return x, None, None, None
    # CPU: sparse rows (on accelerators a data-dependent layout costs a sync; under compile: fixed-width rows)
    sparse = x.device.type == "cpu"
    xc, res, lo, hi = residual.clamp(x, spec.occ.alpha, spec.occ.granularity, sparse)
    if observer is not None:
        observer.record("fprop", "input", {"occ_clamped": residual.density(res)})
    return xc, res, lo, hi


def _occ_backward(x, occ_saved, ctx, spec: LinearSpec):
    """(the activation the forward quantized (OCC-clamped), its residual ΔX or None) from what forward saved."""
    if ctx.occ == "sparse":
        return x, residual.SparseRows(*occ_saved, ctx.occ_k) if spec.occ.compensate else None
    if ctx.occ is None:
        return x, None
    xc = torch.clamp(x, occ_saved[0], occ_saved[1])
    return xc, (x - xc if spec.occ.compensate else None)


def weight_grad(spec: LinearSpec, state: LayerQuantState, gen, xc, res, dy, dyq, xq_saved):
    """(dW [N, K] = Q(dYᵀ)·Q(Xcᵀ)ᵀ, OCC's compensation dYᵀ·ΔX to add to it in fp32, or None), Xc the (clamped)
    activation [M, K]. xc is None when xq_saved (Q(X), reusable as Q(Xᵀ)ᵀ) is given and OCC is off."""
    if spec.wgrad_hp:  # unquantized operands; (x - xc) + xc = x, so OCC's compensation is already in it
        return cpu_bf16.mm(dy.t(), xc if res is None else xc + _dense(res, xc.dtype)), None
    if spec.hadamard_size:
        pad = (-xc.shape[0]) % spec.pad_multiple()
        H, s = state.hadamard_rotation, state.hadamard_signs
        # the dW operands rotated along tokens in their own memory order; the quantizers read the rotated bases
        dyt = rotate(dy, H, s, pad, dy.dtype, transposed=True).t()  # contiguous [M + pad, N]
        xt = rotate(xc, H, s, pad, xc.dtype, transposed=True).t()
        gq = quantize_operand(dyt, spec, "grad_output", state, gen, record=False, gemm="wgrad", transposed=True)[0]
        xq = quantize_operand(xt, spec, "input", state, gen, record=False, gemm="wgrad", transposed=True)[0]
        dw = cpu_bf16.mm(gq.t(), xq)
    else:
        if dyq is not None and spec.reuse_dyq:
            gq = dyq.t()
        else:
            gq = quantize_operand(dy, spec, "grad_output", state, gen, record=False, gemm="wgrad",
                                  transposed=True)[0].t()
        xq = xq_saved
        if xq is None:
            xq = quantize_operand(xc, spec, "input", state, gen, record=False, gemm="wgrad", transposed=True)[0]
        dw = cpu_bf16.mm(gq, xq)
    return dw, None if res is None else residual.tmm(dy, res)


def _plus(dw, comp):
    return dw if comp is None else dw.to(torch.promote_types(comp.dtype, torch.float32)) + comp


def _dge(dw, comp, wc, ctx, spec: LinearSpec):
    """(dW + OCC's compensation) ⊙ f'(W / s), fp32: DGE with the very scales s the forward's weight quantizer used
    (one CPU pass where the kernel applies: scales per row or tensor, W quantized along K)."""
    q = spec.weight  # wc: the weight in the GeMM dtype, as the forward quantized it
    fmt, k, clamp = get_format(q.fmt), spec.dge.k, spec.dge.clamp
    if not spec.weight_in_axis and q.granularity in ("row", "tensor") and wc.numel() and \
            (comp is None or comp.dtype == torch.float32):
        op = _DGE_OP if torch.compiler.is_compiling() and _DGE_OP is not None and dw.device.type == "cpu" \
            else _dge_epilogue
        wc = wc.contiguous()
        return op(dw, comp, wc, *scale_factors(wc, q, ctx.w_amax), q.fmt, k, clamp)
    ws = scaled_values_2d(wc.t().contiguous(), q, amax=ctx.w_amax).t() \
        if spec.weight_in_axis else scaled_values_2d(wc, q, amax=ctx.w_amax)
    return dge_apply(_plus(dw, comp), ws, fmt, k, clamp)


def _dense(res, dtype):
    return res.to_dense(dtype) if isinstance(res, residual.SparseRows) else res


def _dge_epilogue(dw: torch.Tensor, comp: torch.Tensor | None, w: torch.Tensor, scales: torch.Tensor,
                  factors: torch.Tensor | None, fmt: str, k: float, clamp: float) -> torch.Tensor:
    """(dw + comp) · f'(w / scales) (or w · factors), fp32: the C kernel, else the eager steps it fuses."""
    f = get_format(fmt)
    fused = dge_kernels.dge_epilogue(dw, comp, w, scales, factors, f, k, clamp)
    if fused is not None:
        return fused
    ws = w.float() / scales.reshape(-1, 1) if factors is None else w.float() * factors.reshape(-1, 1)
    return dge_apply(_plus(dw, comp), ws, f, k, clamp)


def _register_dge_op():
    """lowbit::dge_epilogue: the weight-gradient epilogue as one opaque op under torch.compile (the same kernel as
    eager), or None (one warning) where this torch's custom_op cannot take it: compiled code then traces it."""
    try:
        op = torch.library.custom_op("lowbit::dge_epilogue", mutates_args=())(_dge_epilogue)
        op.register_fake(lambda dw, comp, w, scales, factors, fmt, k, clamp: dw.new_empty(dw.shape,
                                                                                           dtype=torch.float32))
        return op
    except Exception as e:  # noqa: BLE001 -- a torch whose custom_op cannot take this signature: trace instead
        logging.getLogger("lowbit").warning("torch.compile will trace DGE's epilogue (%s)", e)
        return None


_DGE_OP = _register_dge_op()
