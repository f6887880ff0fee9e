"""Quartet (Castro et al. 2025, "Quartet: Native FP4 Training Can Be Optimal for LLMs"): the autograd Function
of a linear layer under `recipe.scheme == "quartet"`, re-derived from the paper and its public reference code
(IST-DASLab/Quartet: QuestMXFP4Quantizer for X and W, AlbertTsengQuantizer for the backward, backward scheme
Q(E)Q(Wt)t_Q(Et)Q(Xt)t).

Shapes: X [M, K], W [N, K], dY [M, N]; H = the Sylvester Hadamard matrix of order n (32) over √n, applied to
runs of n along a dim; R = diag(s)·H with fresh random signs s at every backward call.

    forward    Xh = X·H, Wh = W·H along K;  Y = Q_f(Xh) · Q_f(Wh)ᵀ            (= X·Wᵀ up to quantization)
               Q_f = `input` / `weight` quantizers (QuEST: power-of-two scale from the group's std, RTN, clip)
    dX         dXh = Q_b(dY·R) · Q_b(Q_f(Wh)ᵀ·R)ᵀ along N;  dX = (dXh ⊙ m_X) · Hᵀ
    dW         dWh = Q_b(dYᵀ·R) · Q_b(Q_f(Xh)ᵀ·R)ᵀ along M;  dW = (dWh ⊙ m_W) · Hᵀ
               Q_b = `grad_output` quantizer (absmax power-of-two scale × 4/3, stochastic rounding)
    m_X, m_W   QuEST's trust masks: 1 where the forward did not clip (|Xh / s| < max)

The backward GeMMs re-quantize the forward's *quantized* operands (the reference does so), so no
high-precision copy of X is kept. The token dim M is zero-padded to a multiple of n for its rotation.
"""
from __future__ import annotations

import logging

import torch

from lowbit import cpu_bf16
from lowbit.formats import get_format
from lowbit.kernels.quest import trust_mask
from lowbit.nn.hadamard import rotate
from lowbit.nn.spec import LinearSpec, fake_quantize_2d
from lowbit.nn.state import LayerQuantState
from lowbit.nn.stats import record_operand
from lowbit.quant import divide_by_scales
from lowbit.rng import random_signs
from lowbit.tensor_quant import TensorQuant


def _trust(t: torch.Tensor, scales: torch.Tensor, fmt: str, granularity: str, block: int) -> torch.Tensor:
    """QuEST's trust mask |t / s| < max (bool, t's shape) from the quantizer's own scales: the C kernel (tiles on
    CPU), else the eager quotient."""
    q = TensorQuant(fmt, granularity, block)
    fmax = get_format(fmt).max
    mask = trust_mask(t, scales, block, fmax) if granularity == "tile" else None
    return divide_by_scales(t, q, scales).abs() < fmax if mask is None else mask


def _register_trust_op():
    """lowbit::trust_mask, opaque under torch.compile (the same kernel as eager instead of a traced quotient), or
    None (one warning) where this torch's custom_op cannot take it."""
    try:
        op = torch.library.custom_op("lowbit::trust_mask", mutates_args=())(_trust)
        op.register_fake(lambda t, scales, fmt, granularity, block: t.new_empty(t.shape, dtype=torch.bool))
        return op
    except Exception as e:  # noqa: BLE001 -- a torch whose custom_op cannot take this signature: trace instead
        logging.getLogger("lowbit").warning("torch.compile will trace Quartet's trust mask (%s)", e)
        return None


_TRUST_OP = _register_trust_op()


def _masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t · mask for a bool mask of t's shape, in t's dtype: the mask read as 0/1 bytes (the same product; torch
    multiplies by a bool tensor through a slow conversion, 4-6x the multiply itself on CPU)."""
    return t * mask.view(torch.uint8)


def _quantize_fwd(t, q, observer, op: str):
    """(Q_f(t), trust mask) for t [rows, L] already rotated, in its dtype."""
    tq, scales = fake_quantize_2d(t, q, with_scales=True)  # L is a multiple of the tile: no padding
    trust = _TRUST_OP if _TRUST_OP is not None and torch.compiler.is_compiling() and t.device.type == "cpu" \
        else _trust
    mask = trust(t, scales, q.fmt, q.granularity, q.block)
    if observer is not None:
        record_operand(observer, "fprop", op, t, tq, q, scales=scales)
    return tq, mask


def _quantize_bwd(t, H, signs, spec: LinearSpec, gen, observer, cdtype, gemm: str, op: str, pad: int = 0,
                  transposed: bool = False):
    """Q_b(t·R) along the last dim of t [rows, L] zero-padded by `pad`, R = diag(signs)·H, in cdtype; gen: this
    call's random stream. transposed: t is a contiguous b standing for b.t() (rotated and quantized in b's own
    memory order, also under torch.compile: no copies); the result is then a transposed view."""
    q = spec.grad_output
    gen = gen if q.rounding == "stochastic" else None
    tr = rotate(t, H, signs, pad, cdtype, transposed=transposed)
    src = tr.t() if transposed else tr  # transposed: the contiguous rotated base
    if observer is None:
        tq = fake_quantize_2d(src, q, gen, transposed=transposed)
        return tq.t() if transposed else tq
    tq, scales = fake_quantize_2d(src, q, gen, with_scales=True, transposed=transposed)
    tq = tq.t() if transposed else tq
    record_operand(observer, gemm, op, tr, tq, q, scales=scales)
    return tq


class QuartetFunction(torch.autograd.Function):
    """x2 [M, K], weight [N, K], bias [N] or None, spec, state, cdtype -> Y [M, N] in cdtype."""

    @staticmethod
    def forward(ctx, x2, weight, bias, spec: LinearSpec, state: LayerQuantState, cdtype):
        H = state.quartet_rotation  # H/√n (hadamard.normalized_hadamard), kept by the layer
        xq, mx = _quantize_fwd(rotate(x2.to(cdtype), H, dtype=cdtype), spec.input, state.observer, "input")
        wq, mw = _quantize_fwd(rotate(weight.to(cdtype), H, dtype=cdtype), spec.weight, state.observer, "weight")
        y = cpu_bf16.linear(xq, wq, None if bias is None else bias.to(cdtype))
        ctx.spec, ctx.state, ctx.observer, ctx.call, ctx.cdtype, ctx.x_dtype = spec, state, state.observer, \
            state.call_index, cdtype, x2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(xq, wq, mx, mw, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, wq, mx, mw, weight = ctx.saved_tensors
        spec, obs, cdtype = ctx.spec, ctx.observer, ctx.cdtype
        gen = ctx.state.streams(ctx.call)[1]  # the backward's part of this call's stream
        n = spec.rotation_size
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(cdtype).contiguous()
            H = ctx.state.quartet_rotation
            s = random_signs(n, dy.device, gen)  # R = diag(s)·H, fresh at every call
            if need_dx:  # along N
                dxh = cpu_bf16.mm(_quantize_bwd(dy, H, s, spec, gen, obs, cdtype, "dgrad", "grad_output"),
                                  _quantize_bwd(wq, H, s, spec, gen, obs, cdtype, "dgrad", "weight",
                                                transposed=True).t())
                dx = rotate(_masked(dxh, mx), H, dtype=ctx.x_dtype)  # H symmetric: Hᵀ = H
            if need_dw:  # along M, zero-padded to a multiple of n
                pad = (-dy.shape[0]) % n
                g = _quantize_bwd(dy, H, s, spec, gen, obs, cdtype, "wgrad", "grad_output", pad, transposed=True)
                xt = _quantize_bwd(xq, H, s, spec, gen, obs, cdtype, "wgrad", "input", pad, transposed=True)
                dwh = cpu_bf16.mm(g, xt.t())
                dw = rotate(_masked(dwh, mw), H, dtype=weight.dtype)
            if need_db and ctx.bias_dtype is not None:
                db = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None
