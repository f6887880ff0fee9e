"""Triton fake-quantize for groups along the last dim (GPU), bit for bit the eager quantizer (lowbit.quant).

Covers granularity "row" and "tile" with the fp32 absmax scale (divide or reciprocal) or E8M0 floor scales, and
one scale for the whole tensor (computed by lowbit.scales, current or delayed), round-to-nearest-even, any element
format, fp32/bf16 in and out. Every step is the eager code's fp32 operation
(see lowbit/kernels/quant.c for the same list): correctly rounded division (`div_rn`: Triton's `/` is an
approximate division on NVIDIA GPUs), the `(v + c) − c` grid rounding, the bit-pattern absmax (NaN propagates),
and bf16 rounding in integer arithmetic (the interpreter's float conversions are not trustworthy near binade
tops). Tested on CPU tensors under TRITON_INTERPRET=1 (tests/test_kernels.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.formats import Format
from lowbit.groups import as3d, scale_shape
from lowbit.scales import E4M3_MAX, nvfp4_tensor_scale
from lowbit.tensor_quant import TensorQuant

# Launch options of every kernel here: no FMA contraction. With Triton's default (fusion on) x·e + c compiles to
# one fma, rounding once where the eager code rounds x·e first (seen in the PTX for sm_90).
OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Elements as fp32 (bf16 widened exactly through its bit pattern)."""
    if BF16:  # one return at the end: Triton compiles every return statement, and their types must agree
        xb = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (xb << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x


@triton.jit
def _round_to_grid(v, fmax, min_normal, k, SAT: tl.constexpr):
    """formats.round_to_grid_ (nearest): saturate if asked, then (v + c) − c with c = 1.5·2^(23−mbits)·E."""
    if SAT:
        v = tl.where(v < -fmax, -fmax, tl.where(v > fmax, fmax, v))
    E = (v.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    E = tl.where(E < min_normal, min_normal, E)
    c = E * k
    return (v + c) - c


@triton.jit
def _fp8_code(v, E4M3: tl.constexpr):
    """The FP8 bit pattern of fp32 v already on the format's grid (torch's float8_e4m3fn / float8_e5m2 cast of
    an exact value: NaN -> 0x7F, e4m3 inf -> 0x7F, e5m2 inf -> 0x7C, signs kept), in integer arithmetic."""
    u = v.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    av = a.to(tl.float32, bitcast=True)
    if E4M3:  # bias 7, 3 mantissa bits; below 2^-6: subnormal m · 2^-9
        c = tl.where(a >= 0x3C800000, (((a >> 23) - 120) << 3) | ((a >> 20) & 7), (av * 512.0).to(tl.uint32))
        c = tl.where(a >= 0x7F800000, 0x7F, c)
    else:  # bias 15, 2 mantissa bits; below 2^-14: subnormal m · 2^-16
        c = tl.where(a >= 0x38800000, (((a >> 23) - 112) << 2) | ((a >> 21) & 3), (av * 65536.0).to(tl.uint32))
        c = tl.where(a == 0x7F800000, 0x7C, tl.where(a > 0x7F800000, 0x7F, c))
    return (c | ((u >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _store(ptr, offs, y, mask, OUT: tl.constexpr):
    """fp32 y stored as OUT: 0 fp32; 1 bf16, rounded as c10::BFloat16 does (nearest even, NaN -> 0x7FC0), in
    integer arithmetic; 2 / 3 the E4M3 / E5M2 code of y (on the grid: quantize()'s codes)."""
    if OUT == 1:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif OUT >= 2:
        tl.store(ptr + offs, _fp8_code(y, OUT == 2), mask=mask)
    else:
        tl.store(ptr + offs, y, mask=mask)


def _out_kind(out: torch.Tensor, fmt: Format) -> int:
    """_store's OUT for an output tensor: uint8 holds FP8 codes of fmt."""
    if out.dtype == torch.uint8:
        return 2 if fmt.name == "e4m3" else 3
    return 1 if out.dtype == torch.bfloat16 else 0


@triton.jit
def _scale_rule(amax, fmax, c_emax, st, RULE: tl.constexpr):
    """(decode s, encode e) from fp32 absmax by scales.scale_from_amax's rule, before its zero/NaN cases:
    RULE 0 fp32 divide, 1 fp32 reciprocal, 2 E8M0 floor, 3 E8M0 ceil, 4 NVFP4 (st: the tensor scale)."""
    if RULE == 0:  # fp32, divide: max(amax / fmax, 2^-126)
        s = tl.math.div_rn(amax, fmax)
        s = tl.where(s < 1.1754943508222875e-38, 1.1754943508222875e-38, s)
        e = s
    elif RULE == 1:  # fp32, reciprocal (torch's fmax / t is t.reciprocal() * fmax)
        e = tl.where(amax == 0, 1.0, tl.math.div_rn(1.0, amax) * fmax)
        e = tl.where(e > 3.4028234663852886e38, 3.4028234663852886e38, e)
        s = tl.math.div_rn(1.0, e)
    elif RULE == 2:  # e8m0 floor: 2^floor(log2 amax) · 2^-emax, at least 2^-127
        p2 = ((amax.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)) * c_emax
        s = tl.where(p2 < 5.877471754111438e-39, 5.877471754111438e-39, p2)
        e = s
    elif RULE == 3:  # e8m0 ceil: 2^ceil(log2(amax / fmax)) in [2^-127, 2^127], from r's bits (frexp, exactly)
        r = tl.math.div_rn(amax, fmax).to(tl.uint32, bitcast=True)
        ex, mant = ((r >> 23) & 0xFF).to(tl.int32), r & 0x7FFFFF
        kp = ex - 126 - (mant == 0).to(tl.int32)
        kp = tl.where(kp > 127, 127, kp)
        sub = tl.where(mant > 0x400000, 0x00800000, 0x00400000)  # r subnormal: 2^-126 or 2^-127
        sub = tl.where(mant == 0, 0x3F800000, sub)  # r underflowed to 0: torch.frexp(0) gives 2^0, so 1
        s = tl.where(ex == 0, sub, (kp + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
        e = s
    else:  # NVFP4: e4m3(amax / fmax / s_t), at least 2^-9, times s_t (NaN when the tensor absmax is not finite)
        d = _round_to_grid(tl.math.div_rn(tl.math.div_rn(amax, fmax), st), 448.0, 0.015625, 1572864.0, True)
        d = tl.where(d < 0.001953125, 0.001953125, d)
        s = d * st
        e = s
    return s, e


@triton.jit
def _special(amax, s):
    """An all-zero group's scale is 1, a group with inf or NaN gets NaN (scales.scale_from_amax)."""
    return tl.where(~(amax < float("inf")), float("nan"), tl.where(amax == 0, 1.0, s))


@triton.jit
def _fake_quant_groups(x_ptr, out_ptr, s_ptr, st_ptr, n_groups, B: tl.constexpr, BP: tl.constexpr,
                       GB: tl.constexpr, fmax, min_normal, k, c_emax, RULE: tl.constexpr, BF16: tl.constexpr,
                       SAT: tl.constexpr, DEQUANT: tl.constexpr, OUT: tl.constexpr):
    """Per group of B: out = round(x / s) · s (DEQUANT; else the fp32 rounded values round(x / s)), s_ptr = s.
    RULE: 0 fp32 divide, 1 fp32 reciprocal, 2 E8M0 floor, 3 E8M0 ceil, 4 NVFP4 (st_ptr: the tensor scale)."""
    pid = tl.program_id(0)
    g = pid * GB + tl.arange(0, GB)[:, None]  # [GB, 1] group indices
    j = tl.arange(0, BP)[None, :]  # [1, BP] element within the group
    mask = (g < n_groups) & (j < B)
    offs = g * B + j
    x = _load_f32(x_ptr, offs, mask, BF16)
    bits = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    ab = tl.max(bits, axis=1)[:, None]  # magnitude patterns: NaN sorts above inf
    amax = tl.where(ab > 0x7F800000, float("nan"), ab.to(tl.float32, bitcast=True))
    st = tl.load(st_ptr) if RULE == 4 else 1.0
    s, e = _scale_rule(amax, fmax, c_emax, st, RULE)
    s, e = _special(amax, s), _special(amax, e)
    v = x * e if RULE == 1 else tl.math.div_rn(x, s)
    v = _round_to_grid(v, fmax, min_normal, k, SAT)
    y = v * s if DEQUANT else v
    _store(out_ptr, offs, y, mask, OUT)
    first = j == 0
    tl.store(s_ptr + g + j * 0, s + x * 0, mask=(g < n_groups) & first)


@triton.jit
def _quant_scaled(x_ptr, out_ptr, s_ptr, e_ptr, n, B, G, PER_ROW: tl.constexpr,
                  BLOCK: tl.constexpr, fmax, min_normal, k, USE_E: tl.constexpr, BF16: tl.constexpr,
                  SAT: tl.constexpr, INF: tl.constexpr, DEQUANT: tl.constexpr, OUT: tl.constexpr):
    """x viewed as [R, G, B] with given fp32 decode scales s (encode factors e with USE_E) of shape [R, G]
    (PER_ROW) or [G] shared by every row (one scale for the tensor: G = B = 1): round(x / s) (or round(x · e)),
    times s with DEQUANT, as lowbit.quant's elementwise kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_f32(x_ptr, offs, mask, BF16)
    si = offs // B if PER_ROW else (offs // B) % G
    s = tl.load(s_ptr + si, mask=mask, other=1.0)
    v = x * tl.load(e_ptr + si, mask=mask, other=1.0) if USE_E else tl.math.div_rn(x, s)
    v = _round_to_grid(v, fmax, min_normal, k, SAT)
    if INF:  # e5m2 keeps ±inf (the clamp made it ±max)
        v = tl.where((x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) == 0x7F800000, x, v)
    y = v * s if DEQUANT else v
    _store(out_ptr, offs, y, mask, OUT)


def quantize_scaled(x3: torch.Tensor, s3: torch.Tensor, e3: torch.Tensor | None, fmt: Format, saturate: bool,
                    out3: torch.Tensor, dequant: bool = True) -> torch.Tensor:
    """out3 = round(x3 / s3) (round(x3 · e3) with encode factors), times s3 if dequant: x3 [R, G, B] contiguous
    fp32/bf16, s3/e3 [R|1, G, 1] fp32 (lowbit.quant's layout), out3 like x3 (fp32 without dequant). Saturate
    when the caller's rule needs it; e5m2 keeps ±inf then."""
    R, G, B = x3.shape
    n = x3.numel()
    s = s3.float().contiguous()
    e = s if e3 is None else e3.float().contiguous()
    _quant_scaled[(triton.cdiv(n, 1024),)](
        x3, out3, s, e, n, B=B, G=G, PER_ROW=s3.shape[0] > 1 or R == 1, BLOCK=1024, fmax=fmt.max,
        min_normal=fmt.min_normal, k=1.5 * 2.0 ** (23 - fmt.mbits), USE_E=e3 is not None,
        BF16=x3.dtype == torch.bfloat16, SAT=saturate, INF=saturate and fmt.has_inf, DEQUANT=dequant,
        OUT=_out_kind(out3, fmt), **OPTIONS)
    return out3


@triton.jit
def _quant_tensor(x_ptr, out_ptr, a_ptr, s_ptr, n, BLOCK: tl.constexpr, fmax, min_normal, k, c_emax, mult,
                  RULE: tl.constexpr, MULT: tl.constexpr, BF16: tl.constexpr, SAT: tl.constexpr,
                  INF: tl.constexpr, DEQUANT: tl.constexpr, OUT: tl.constexpr):
    """One scale for all n elements from the fp32 absmax at a_ptr (measured or delayed), computed by every
    program as scales.scale_from_amax does (no host-side scale ops), program 0 storing it at s_ptr; then the
    elements as _quant_scaled does (reciprocal rules multiply by the encode factor)."""
    amax = tl.load(a_ptr)
    st = 1.0
    if RULE == 4:  # NVFP4's tensor scale, t = amax itself (scales.nvfp4_tensor_scale); NaN if t is not finite
        st = tl.math.div_rn(amax, fmax * 448.0)
        st = tl.where((amax == 0) | (st == 0), 1.0, st)
        st = tl.where(amax < float("inf"), st, float("nan"))
    s, e = _scale_rule(amax, fmax, c_emax, st, RULE)
    if MULT:  # scale_mult: s · m, e / m (at most fp32's max)
        s = s * mult
        e = tl.math.div_rn(e, mult)
        e = tl.where(e > 3.4028234663852886e38, 3.4028234663852886e38, e)
    s, e = _special(amax, s), _special(amax, e)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_f32(x_ptr, offs, mask, BF16)
    v = x * e if RULE == 1 else tl.math.div_rn(x, s)
    v = _round_to_grid(v, fmax, min_normal, k, SAT)
    if INF:  # e5m2 keeps ±inf (the clamp made it ±max)
        v = tl.where((x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) == 0x7F800000, x, v)
    y = v * s if DEQUANT else v
    _store(out_ptr, offs, y, mask, OUT)
    tl.store(s_ptr + offs * 0, s + x * 0, mask=offs == 0)


def quantize_tensor(x: torch.Tensor, amax: torch.Tensor, q: TensorQuant, fmt: Format, saturate: bool,
                    dequant: bool = True, codes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x contiguous fp32/bf16 quantized with one scale from the 0-d fp32 absmax `amax`, that scale 0-d fp32):
    fake-quantized in x's dtype, or the rounded fp32 values (dequant=False), or their FP8 codes (codes=True)."""
    out = torch.empty_like(x, dtype=torch.uint8 if codes else x.dtype if dequant else torch.float32)
    s = torch.empty((), dtype=torch.float32, device=x.device)
    n = x.numel()
    rule = _RULES[(q.scale_fmt, q.scale_round if q.scale_fmt == "e8m0" else q.reciprocal)]
    _quant_tensor[(max(1, triton.cdiv(n, 1024)),)](
        x, out, amax.reshape(()).float(), s, n, BLOCK=1024, fmax=fmt.max, min_normal=fmt.min_normal,
        k=1.5 * 2.0 ** (23 - fmt.mbits), c_emax=2.0 ** -fmt.emax, mult=q.scale_mult, RULE=rule,
        MULT=q.scale_mult != 1.0, BF16=x.dtype == torch.bfloat16, SAT=saturate, INF=saturate and fmt.has_inf,
        DEQUANT=dequant, OUT=_out_kind(out, fmt), **OPTIONS)
    return out, s


def scaled_applies(x: torch.Tensor, q: TensorQuant) -> bool:
    """Whether quantize_scaled covers x under q once the eager code has its scales: round-to-nearest, fp32/bf16,
    any granularity and scale rule but 4-over-6 (which picks between two roundings)."""
    return x.dtype in (torch.float32, torch.bfloat16) and q.rounding == "nearest" and not q.four_over_six


def applies(x: torch.Tensor, q: TensorQuant, amax) -> bool:
    """Whether the fused Triton kernels cover x under q: fake-quantize or quantize, round-to-nearest, fp32/bf16;
    row/tile groups or one scale for the tensor, with fp32, E8M0 (floor or ceil) or NVFP4 (divide) scales; the
    tensor's scale current or delayed, with any scale_mult; the groups' current, without."""
    if (x.dtype not in (torch.float32, torch.bfloat16) or q.rounding != "nearest" or q.scale_rule != "absmax"
            or q.four_over_six):
        return False
    key = (q.scale_fmt, q.scale_round if q.scale_fmt == "e8m0" else q.reciprocal)
    if q.granularity == "tensor":  # any scale_mult, current or delayed amax
        return key in _RULES
    return q.granularity in ("row", "tile") and amax is None and q.scale_mult == 1.0 and key in _RULES


# (scale_fmt, E8M0 rounding or fp32/e4m3 reciprocal) -> _fake_quant_groups' RULE. E8M0 scales are powers of
# two, so x / s and x · (1/s) agree: the reciprocal flag does not matter there.
_RULES = {("fp32", False): 0, ("fp32", True): 1, ("e8m0", "floor"): 2, ("e8m0", "ceil"): 3, ("e4m3", False): 4}


def fake_quantize_groups(x3: torch.Tensor, q: TensorQuant, fmt: Format, dequant: bool = True, codes: bool = False,
                         st: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x3, decode scales [R, G]) for contiguous x3 [R, G, B] (fp32 or bf16), as lowbit.quant;
    dequant=False: the fp32 rounded values instead of x3's dtype's fake-quantized ones; codes=True: their FP8
    codes (uint8). st: NVFP4's fp32 tensor scale (NaN when the tensor absmax is not finite), for scale_fmt e4m3."""
    R, G, B = x3.shape
    out = torch.empty_like(x3, dtype=torch.uint8 if codes else x3.dtype if dequant else torch.float32)
    scales = torch.empty((R, G), dtype=torch.float32, device=x3.device)
    n = R * G
    GB = max(1, min(64, 4096 // triton.next_power_of_2(B)))
    rule = _RULES[(q.scale_fmt, q.scale_round if q.scale_fmt == "e8m0" else q.reciprocal)]
    saturate = not (q.scale_fmt == "fp32" and not q.reciprocal)  # as quant._run: divide by the fp32 absmax scale
    st = scales if st is None else st.reshape(1).float()
    _fake_quant_groups[(triton.cdiv(n, GB),)](
        x3, out, scales, st, n, B=B, BP=triton.next_power_of_2(B), GB=GB, fmax=fmt.max, min_normal=fmt.min_normal,
        k=1.5 * 2.0 ** (23 - fmt.mbits), c_emax=2.0 ** -fmt.emax, RULE=rule, BF16=x3.dtype == torch.bfloat16,
        SAT=saturate, DEQUANT=dequant, OUT=_out_kind(out, fmt), **OPTIONS)
    return out, scales


def quantize(x: torch.Tensor, q: TensorQuant, fmt: Format, amax, saturate: bool, dequant: bool = True,
                codes: bool = False):
    """(fake-quantized x, or its rounded fp32 values without dequant, or their FP8 codes (uint8) with codes;
    the decode scales) from the fused kernels here, for x contiguous on a GPU: the per-tensor absmax (or NVFP4's
    tensor scale) by torch ops without a host sync, the rest in one kernel."""
    if q.granularity == "tensor":  # the absmax here (no host sync), the scale inside the kernel
        if amax is None:  # max |x| from one pass (aminmax), NaN propagating
            lo, hi = torch.aminmax(x)
            a = torch.maximum(hi, -lo).float()
        else:
            a = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(()).abs()
        out, s = quantize_tensor(x, a, q, fmt, saturate, dequant, codes)
        return out.view(x.shape), s
    st = None
    if q.scale_fmt == "e4m3":  # NVFP4: the tensor scale first, as lowbit.scales computes it
        lo, hi = torch.aminmax(x)
        t, st = nvfp4_tensor_scale(None, torch.maximum(hi, -lo).float(), fmt, E4M3_MAX)
        st = torch.where(t < math.inf, st, math.nan)
    out, scales = fake_quantize_groups(as3d(x, q), q, fmt, dequant, codes, st)
    return out.view(x.shape), scales.view(scale_shape(x.shape, q))


@triton.jit
def _transpose(x_ptr, out_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """out [C, R] = x [R, C]ᵀ, one BR x BC tile per program: read and written along rows (Triton turns the tile
    around in shared memory), where torch's strided copy writes with a stride of R elements."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r[:, None] < R) & (c[None, :] < C)
    t = tl.load(x_ptr + r[:, None].to(tl.int64) * C + c[None, :], mask=mask)
    tl.store(out_ptr + c[:, None].to(tl.int64) * R + r[None, :], tl.trans(t), mask=tl.trans(mask))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # moved as integers: one kernel per width, any dtype


def transpose(x: torch.Tensor) -> torch.Tensor:
    """x.t().contiguous() for a contiguous 2-D tensor of 1-, 2- or 4-byte elements (FP8 codes, bf16, fp32), in one
    tiled pass."""
    R, C = x.shape
    out = torch.empty((C, R), dtype=x.dtype, device=x.device)
    if x.numel():
        bits = _BITS[x.element_size()]
        _transpose[(triton.cdiv(R, 64), triton.cdiv(C, 64))](x.view(bits), out.view(bits), R, C, BR=64, BC=64)
    return out
