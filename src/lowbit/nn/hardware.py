"""gemm = "hardware": the three GeMMs of a linear layer on real FP8 codes through torch._scaled_mm.

The operands are quantized by the same quantizer the simulation uses (lowbit.quant.quantize: the very codes and
scales fake_quantize dequantizes), then multiplied by the FP8 GeMM with per-tensor or per-row fp32 scales, so a
hardware run equals a gemm = "exact" simulation up to the GeMM's accumulation order. Each GeMM quantizes its two
operands along its reduction dim, as the simulation does:
    Y  = Q(X) · Q(W)ᵀ            X [M, K] rows, W [N, K] rows
    dX = Q(dY) · Q_dg(Wᵀ)ᵀ        dY [M, N] rows, Wᵀ [K, N] rows (dgrad_weight's quantizer when the recipe sets one)
    dW = Q(dYᵀ) · Q(Xᵀ)ᵀ          dYᵀ [N, M] rows, Xᵀ [K, M] rows (high precision with wgrad_high_precision)
Which recipes can run here is recipes.hardware_problem's rule (FP8, tensor or row scales, nearest rounding, no
OCC/DGE/Hadamard). torch._scaled_mm runs tensorwise and rowwise FP8 on CPUs too (a numerics path there: slower
than a bf16 matmul) and on CUDA GPUs with FP8 tensor cores (SM89+). Statistics are not collected on this path.
"""
from __future__ import annotations

import torch

from lowbit.quant import quantize

_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def check_device(device: torch.device) -> None:
    """One line naming what is missing where torch._scaled_mm has no FP8 GeMM: a CUDA GPU below SM89, or a device
    other than a CPU or a CUDA GPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"gemm='hardware' needs FP8 tensor cores (SM89+: Ada, Hopper, Blackwell); "
                             f"{torch.cuda.get_device_name(device)} is SM{major}{minor}: use gemm='rounded' to "
                             "simulate")
    elif device.type != "cpu":
        raise ValueError(f"gemm='hardware' runs on CPUs and CUDA GPUs (SM89+), not on {device.type}; "
                         "use gemm='rounded' to simulate")


def _codes(t: torch.Tensor, q, amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 codes [R, K], fp32 scales [R, 1]) of t [R, K] quantized along its last dim."""
    qt = quantize(t.contiguous(), q, None, amax)
    return qt.codes.view(_FP8[q.fmt]), qt.scales.float().reshape(-1, 1).expand(t.shape[0], 1).contiguous()


def scaled_mm(a: torch.Tensor, qa, b: torch.Tensor, qb, out_dtype: torch.dtype, amax_a=None,
              amax_b=None) -> torch.Tensor:
    """Q(a) · Q(b)ᵀ for a [M, K], b [N, K], each quantized along K (qa, qb), as one FP8 GeMM -> [M, N]."""
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:  # an expert no token chose: nothing to multiply
        return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    ca, sa = _codes(a, qa, amax_a)
    cb, sb = _codes(b, qb, amax_b)
    if qa.granularity == "tensor" and qb.granularity == "tensor":
        sa, sb = sa[:1, 0].reshape(()), sb[:1, 0].reshape(())  # tensorwise: one scale each
    else:
        sb = sb.reshape(1, -1)
    return torch._scaled_mm(ca, cb.t(), sa, sb, out_dtype=out_dtype)


class HardwareLinearFunction(torch.autograd.Function):
    """x2 [M, K], weight [N, K], bias [N] or None, spec, state, cdtype -> Y [M, N] in cdtype; the GeMMs in FP8."""

    @staticmethod
    def forward(ctx, x2, weight, bias, spec, state, cdtype):
        check_device(x2.device)
        x, w = x2.to(cdtype), weight.to(cdtype)
        ax = state.delayed_amax("input", x, True) if spec.delayed else None
        aw = state.delayed_amax("weight", w, True) if spec.delayed else None
        y = scaled_mm(x, spec.input, w, spec.weight, torch.float32, ax, aw)
        if bias is not None:
            y = y + bias.to(cdtype).float()  # as the simulation: the bias rounded to the compute dtype first
        ctx.spec, ctx.state, ctx.cdtype, ctx.x_dtype, ctx.w_dtype, ctx.aw = spec, state, cdtype, x2.dtype, \
            weight.dtype, aw
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, w)
        return y.to(cdtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        spec, state = ctx.spec, ctx.state
        dy = dy.to(ctx.cdtype).contiguous()
        ag = state.delayed_amax("grad_output", dy, True) if spec.delayed else None
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            qw = spec.dgrad_weight or spec.weight
            dx = scaled_mm(dy, spec.grad_output, w.t(), qw, torch.float32, ag, ctx.aw).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if spec.wgrad_hp:  # the weight-gradient GeMM in high precision (fp32 accumulation)
                dw = dy.float().t() @ x.float()
            else:
                ax = state.delayed_amax("input", x, False) if spec.delayed else None  # the history, as the forward's
                dw = scaled_mm(dy.t(), spec.grad_output, x.t(), spec.input, torch.float32, ag, ax)
            dw = dw.to(ctx.w_dtype)
        if ctx.needs_input_grad[2] and ctx.bias_dtype is not None:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None
