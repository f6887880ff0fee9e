"""gemm = "hardware": the three GeMMs of a linear layer on real FP8 codes through torch._scaled_mm.

The operands are quantized by the same quantizer the simulation uses (lowbit.quant.quantize: the very codes and
scales fake_quantize dequantizes), then multiplied by the FP8 GeMM with per-tensor or per-row fp32 scales, so a
hardware run equals a gemm = "exact" simulation up to the GeMM's accumulation order. Each GeMM quantizes its two
operands along its reduction dim, as the simulation does:
    Y  = Q(X) · Q(W)ᵀ            X [M, K] rows, W [N, K] rows
    dX = Q(dY) · Q_dg(Wᵀ)ᵀ        dY [M, N] rows, Wᵀ [K, N] rows (dgrad_weight's quantizer when the recipe sets one)
    dW = Q(dYᵀ) · Q(Xᵀ)ᵀ          dYᵀ [N, M] rows, Xᵀ [K, M] rows (high precision with wgrad_high_precision)
Which recipes can run here is recipes.hardware_problem's rule (FP8; tensor, row, or DeepSeek-V3's 1x128 tile and
128x128 block scales; nearest rounding; no OCC/DGE/Hadamard). torch._scaled_mm runs tensorwise and rowwise FP8 on
CPUs too (a numerics path there: slower than a bf16 matmul) and on CUDA GPUs with FP8 tensor cores (SM89+); the
block-scaled GeMM (fp8-block) on Hopper through cuBLAS 12.9+. Statistics are not collected on this path.
"""
from __future__ import annotations

import torch

from lowbit import cpu_bf16
from lowbit.kernels import contiguous_2d
from lowbit.quant import quantize

_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _granularities(spec) -> set[str]:
    return {q.granularity for q in (spec.input, spec.weight, spec.grad_output, spec.dgrad_weight) if q is not None}


_CPU_ROWWISE: list[bool] = []  # whether this torch's CPU _scaled_mm takes per-row scales (probed once)


def cpu_rowwise() -> bool:
    """Whether this torch's CPU _scaled_mm takes per-row scales (torch >= 2.13): probed once per process with one
    16x16 product. Where it does, CPU GeMMs get even per-tensor scales as a column and a row (_gemm)."""
    if not _CPU_ROWWISE:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        try:
            torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.float32)
            _CPU_ROWWISE.append(True)
        except RuntimeError:  # torch 2.11's CPU kernel (oneDNN) asserts per-tensor scales
            _CPU_ROWWISE.append(False)
    return _CPU_ROWWISE[0]


def check_device(device: torch.device, spec) -> None:
    """One line naming what is missing where torch._scaled_mm has no FP8 GeMM for the spec's scales: tensorwise
    runs on CPUs and CUDA GPUs from SM89; rowwise on those GPUs and on CPUs with torch >= 2.13; 1x128/128x128
    block scales on Hopper (SM90) through cuBLAS 12.9+ only."""
    kinds = _granularities(spec)
    blockwise = bool(kinds & {"tile", "block"})
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (SM{major}{minor})"
        if (major, minor) < (8, 9):
            raise ValueError(f"gemm='hardware' needs FP8 tensor cores (SM89+: Ada, Hopper, Blackwell); {where} "
                             "has none: use gemm='rounded' to simulate")
        if "row" in kinds and major != 9:  # elsewhere torch writes rowwise in bf16 only
            raise ValueError(f"gemm='hardware' with rowwise FP8 scales needs a Hopper GPU (SM90, cuBLAS 12.9+); "
                             f"{where} runs them with bf16 outputs only: use gemm='rounded' to simulate")
        if not blockwise or major == 9:
            return
        need = "FP8 GeMMs with 1x128/128x128 block scales (fp8-block) need a Hopper GPU (SM90) with CUDA 12.9+"
    elif device.type == "cpu":
        where = f"a CPU with torch {torch.__version__}"
        if blockwise:
            need = "FP8 GeMMs with 1x128/128x128 block scales (fp8-block) need a Hopper GPU (SM90) with CUDA 12.9+"
        elif "row" in kinds and not cpu_rowwise():
            need = "rowwise FP8 GeMMs on a CPU need torch >= 2.13 (this torch's CPU _scaled_mm takes per-tensor scales)"
        else:
            return
    else:
        where, need = device.type, "FP8 GeMMs need a CPU or a CUDA GPU (SM89+)"
    raise ValueError(f"gemm='hardware': {need}; this is {where}: use gemm='rounded' to simulate")


_CHECKED: set[tuple] = set()  # (CUDA device index, scale kinds) that passed check_device


def check_once(device: torch.device, spec) -> None:
    """check_device at a layer's call: remembered per CUDA device and scale kinds (its device queries cost host
    time at every call), skipped while torch.compile traces (a graph break per layer otherwise; the trainer runs
    check_model before compiling)."""
    if torch.compiler.is_compiling():
        return
    if device.type != "cuda":  # CPU checks query nothing (and tests fake the CPU probe): no memo
        check_device(device, spec)
        return
    key = (device.index, frozenset(_granularities(spec)))
    if key not in _CHECKED:
        check_device(device, spec)
        _CHECKED.add(key)


def check_model(model: torch.nn.Module, device: torch.device) -> None:
    """check_device for every layer of `model` that runs its GeMMs on hardware (before training or compiling)."""
    for m in model.modules():
        spec = getattr(m, "spec", None)
        if getattr(spec, "hardware", False):
            check_device(device, spec)


def _operand(t: torch.Tensor, q, amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, K] quantized along K -> (FP8 codes [R, K], fp32 dequantization scales laid out as torch._scaled_mm
    takes them for its *first* operand): tensor [] · row [R, 1] · tile 1x128 [R, K/128], outer-dim-major
    (strides (1, R), as cuBLAS reads 1D block scales) · block 128x128: the same 1x128 layout, each row carrying
    its block's scale. (cuBLAS's own 128x128 layout wants the scale rows padded to a multiple of 4 blocks, which
    torch 2.11 neither does nor checks: on an H200 a K of 384 gave garbage. 1x128 everywhere is the same
    product with one more scale load per 128 codes.)"""
    qt = quantize(contiguous_2d(t), q, None, amax)  # Xᵀ, dYᵀ, Wᵀ: one tiled transpose on GPUs
    codes, s, (R, K) = qt.codes.view(_FP8[q.fmt]), qt.scales.float(), t.shape
    if q.granularity == "tensor":
        return codes, s.reshape(())
    if q.granularity == "row":
        return codes, s.reshape(R, 1)
    if q.granularity == "block":
        s = s.reshape(R // q.block, K // q.block).repeat_interleave(q.block, 0)
    return codes, s.reshape(R, K // q.block).t().contiguous().t()


def _gemm(a, qa, b, qb, out_dtype: torch.dtype, bias=None) -> torch.Tensor:
    """Q(a) · Q(b)ᵀ (+ bias [N] in out_dtype, added to the fp32 result before its one rounding) [M, N] from
    _operand's (codes [M, K], scales) a and (codes [N, K], scales) b. The second operand goes in transposed
    (codes [K, N] column-major), its scales with it: row [1, N], tile and block [K/128, N]; a tensor scale beside
    a row scale is broadcast to a row."""
    (ca, sa), (cb, sb) = a, b
    tensor = qa.granularity == qb.granularity == "tensor"
    if "row" in (qa.granularity, qb.granularity) or (tensor and ca.device.type == "cpu" and cpu_rowwise()):
        # rowwise (a tensor scale beside a row one broadcast to a row). On a CPU per-tensor scales go in as rows
        # too: torch's CPU kernel for per-tensor scales is a scalar loop on some CPUs (an AMX Xeon: 0.07
        # GFLOP/s, 256^3 in 0.9 s), its per-row one ~600x faster there; the same product up to summation order.
        # Decided by what this torch offers, never by a timing.
        sa = sa.reshape(-1, 1).expand(ca.shape[0], 1).contiguous()
        sb = sb.reshape(1, -1).expand(1, cb.shape[0]).contiguous()
    else:  # tensorwise, or block-scaled: b's scales transposed with it
        sb = sb.t()
    if bias is None:
        return torch._scaled_mm(ca, cb.t(), sa, sb, out_dtype=out_dtype)
    return torch._scaled_mm(ca, cb.t(), sa, sb, bias=bias, out_dtype=out_dtype)


def _fused_bias(bias, spec, cdtype: torch.dtype):
    """The bias in bf16 where Y's GeMM adds it in its epilogue (bf16 compute, tensor or row scales: fp32
    alpha·acc + bias, one rounding to bf16, what the simulation's fp32 Y + bias then cast computes; saves two
    fp32 [M, N] passes), else None."""
    if bias is None or cdtype != torch.bfloat16 or _granularities(spec) - {"tensor", "row"}:
        return None
    return bias.to(torch.bfloat16)


def scaled_mm(a: torch.Tensor, qa, b: torch.Tensor, qb, out_dtype: torch.dtype, amax_a=None,
              amax_b=None, bias=None) -> torch.Tensor:
    """Q(a) · Q(b)ᵀ (+ bias [N] in out_dtype) for a [M, K], b [N, K], each quantized along K (qa, qb), as one FP8
    GeMM -> [M, N]."""
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:  # an expert no token chose: nothing to multiply
        y = torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
        return y if bias is None else y + bias
    return _gemm(_operand(a, qa, amax_a), qa, _operand(b, qb, amax_b), qb, out_dtype, bias)


def _transposed(op):
    """The operand of tᵀ from t's, for a quantizer with one scale per tensor: Q(tᵀ) = Q(t)ᵀ exactly (same
    absmax, same scale, each element rounded alike), so the backward transposes 1-byte codes instead of
    quantizing the bf16 tensor again (what Transformer Engine's cast-transpose does)."""
    c, s = op
    return contiguous_2d(c.t()), s


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a GeMM whose result is cast to `dtype` writes: `dtype` itself where _scaled_mm writes it (the same single
    rounding of the fp32 result, one pass less), else fp32."""
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32  # (fp16: not in every rowwise kernel)


class HardwareLinearFunction(torch.autograd.Function):
    """x2 [M, K], weight [N, K], bias [N] or None, spec, state, cdtype -> Y [M, N] in cdtype; the GeMMs in FP8.
    Operands with one current scale per tensor are quantized once and their codes transposed for the backward."""

    @staticmethod
    def forward(ctx, x2, weight, bias, spec, state, cdtype):
        check_once(x2.device, spec)
        x, w = x2.to(cdtype), weight.to(cdtype)
        ax = state.delayed_amax("input", x, True) if spec.delayed else None
        aw = state.delayed_amax("weight", w, True) if spec.delayed else None
        tensorwise = x.numel() > 0 and w.numel() > 0
        # X's history is read again in the backward (delayed): reuse only current scales; W's amax is passed on
        ctx.reuse_x = tensorwise and spec.input.granularity == "tensor" and not spec.delayed and not spec.wgrad_hp
        ctx.reuse_w = tensorwise and spec.weight.granularity == "tensor" and spec.dgrad_weight in (None, spec.weight)
        # the GeMM writes cdtype itself (one rounding of alpha·acc, as fp32-then-cast), and adds the bias in its
        # epilogue where it can (_fused_bias); elsewhere Y is fp32 when a bias follows
        fb = _fused_bias(bias, spec, cdtype)
        ydt = torch.float32 if bias is not None and fb is None else _out_dtype(cdtype)
        if ctx.reuse_x or ctx.reuse_w:
            opx, opw = _operand(x, spec.input, ax), _operand(w, spec.weight, aw)
            y = _gemm(opx, spec.input, opw, spec.weight, ydt, fb)
        else:
            y = scaled_mm(x, spec.input, w, spec.weight, ydt, ax, aw, fb)
        if bias is not None and fb is None:
            y = y + bias.to(cdtype).float()  # as the simulation: the bias rounded to the compute dtype first
        ctx.spec, ctx.state, ctx.cdtype, ctx.x_dtype, ctx.w_dtype, ctx.aw = spec, state, cdtype, x2.dtype, \
            weight.dtype, aw
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(*(opx if ctx.reuse_x else (x, None)), *(opw if ctx.reuse_w else (w, None)))
        return y.to(cdtype)

    @staticmethod
    def backward(ctx, dy):
        x, sx, w, sw = ctx.saved_tensors
        spec, state = ctx.spec, ctx.state
        dy = dy.to(ctx.cdtype).contiguous()
        ag = state.delayed_amax("grad_output", dy, True) if spec.delayed else None
        qg, (M, N), K = spec.grad_output, dy.shape, x.shape[1]
        opdy = _operand(dy, qg, ag) if dy.numel() and K else None  # along N; dYᵀ's too when one scale per tensor
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            qw = spec.dgrad_weight or spec.weight
            if opdy is None:
                dx = torch.zeros(M, K, dtype=torch.float32, device=dy.device)
            else:
                opwt = _transposed((w, sw)) if ctx.reuse_w else _operand(w.t(), qw, ctx.aw)
                dx = _gemm(opdy, qg, opwt, qw, _out_dtype(ctx.x_dtype))
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if spec.wgrad_hp:  # the weight-gradient GeMM unquantized in the compute dtype, as the simulation
                dw = cpu_bf16.mm(dy.t(), x)
            elif opdy is None:
                dw = torch.zeros(N, K, dtype=torch.float32, device=dy.device)
            else:
                opdyt = _transposed(opdy) if qg.granularity == "tensor" else _operand(dy.t(), qg, ag)
                if ctx.reuse_x:
                    opxt = _transposed((x, sx))
                else:  # delayed: X's amax read from the history again, as in the forward
                    ax = state.delayed_amax("input", x, False) if spec.delayed else None
                    opxt = _operand(x.t(), spec.input, ax)
                dw = _gemm(opdyt, qg, opxt, spec.input, _out_dtype(ctx.w_dtype))
            dw = dw.to(ctx.w_dtype)
        if ctx.needs_input_grad[2] and ctx.bias_dtype is not None:
            db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # fp32 accumulation, no fp32 copy of dY
        return dx, dw, db, None, None, None
