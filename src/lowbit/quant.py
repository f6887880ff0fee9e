"""Scaled quantization: absmax scales, quantize / dequantize / fake_quantize.

A tensor is quantized in *groups* that share one scale; `TensorQuant.granularity`:

    "tensor"  one scale for the whole tensor;
    "row"     one scale per vector along the last dim (per token / per output channel);
    "tile"    one scale per 1×block run along the last dim;
    "block"   one scale per block×block square over the last two dims (inputs with
              more than 2 dims are flattened to 2-D [rows, last] first).

scale = absmax(group) / fmt.max, so the group's absmax maps onto the format's max,
with the scale itself stored in `TensorQuant.scale_fmt`:

    "fp32"  the scale as computed (but at least 2^-126, fp32's smallest normal number);
    "e8m0"  OCP MX: 2^(floor(log2 absmax) − emax_elem) with emax_elem = floor(log2 fmt.max)
            (so scaled values reach up to 2^(emax_elem+1) and the top ones saturate);
    "e4m3"  NVFP4 two-level: tensor scale s_t = absmax(tensor) / (fmt.max · 448) in fp32,
            group scale cast_e4m3(absmax(group) / fmt.max / s_t) (raised to E4M3's smallest
            subnormal 2^-9 so no group scale is 0; s_t = 1 when it would be 0); the effective
            scale is their fp32 product.

Zeros: values that are zero or round to zero come out as +0 (the sign of zero is not kept
here, which saves two passes; `lowbit.formats.cast` keeps it).

Special groups: an all-zero group gets scale 1 (zeros stay zeros, no NaN). A group
whose absmax is inf or NaN gets scale NaN, so the whole group comes out NaN: a
non-finite input surfaces instead of being silently zeroed or saturated (for
"e4m3" scales the tensor scale is shared, so the whole tensor becomes NaN).

The shape of scales (what `absmax_scale` returns and `QTensor.scales` holds), for x of
shape [..., C] with R = prod(leading dims):
    tensor: []                     broadcasts against x
    row:    [..., 1]               broadcasts against x
    tile:   [..., C/block, 1]      broadcasts against x.view(..., C/block, block)
    block:  [R/block, 1, C/block, 1]  broadcasts against x.reshape(R/block, block, C/block, block)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.buffers import scratch
from lowbit.codes import decode4, encode4, pack4, unpack4
from lowbit.formats import check_float, chunk_elems, empty, get_format, round_to_grid_
from lowbit.group_amax import absmax3, group_absmax, scales3
from lowbit.groups import as3d, group_scales, rows_scales, scale_shape, tree_sum
from lowbit.quant_op import register_quantize_op
from lowbit.rng import Stream
from lowbit.scales import E4M3_MAX_4OVER6, scale_from_amax
from lowbit.tensor_quant import TensorQuant

# --- checks and scales (where the scales come from: lowbit.group_amax) ------------------------

def _check_q(q):
    if not isinstance(q, TensorQuant):
        raise TypeError(f"q must be a lowbit.recipes.TensorQuant, got {type(q).__name__}")


def absmax_scale(x: torch.Tensor, q: TensorQuant, amax=None) -> torch.Tensor:
    """fp32 scales of x under q (shapes: see the module docstring). `amax` (a scalar)
    replaces the measured absmax, for granularity "tensor" only (delayed scaling)."""
    _check_q(q)
    check_float(x)
    fmt = get_format(q.fmt)
    x3 = as3d(x.contiguous(), q)
    if x.numel() == 0:
        return torch.empty(scale_shape(x.shape, q), dtype=torch.float32, device=x.device)
    return group_scales(scales3(x3, q, fmt, amax)[0], x.shape, q)


# --- the elementwise kernel ----------------------------------------------------------------

def _kernel(x3, s3, e3, q, fmt, generator, saturate, out3, dequant, fused, tensor_amax):
    """out3 = round(x3 / s3) or round(x3 · e3) (· s3 if dequant), in chunks of rows that stay in cache.

    x3: [R, G, B] any float dtype; out3: like x3 (fp32 if not dequant); s3: [R|1, G, 1] fp32 decode
    scales, e3: encode factors (q.reciprocal) or None; or (fused) empty [R, G, 1] buffers filled here
    from each chunk's absmax, so x is read from memory once. Zeros come out as +0.
    """
    R = x3.shape[0]
    per_row = max(1, x3[0].numel())
    step = max(1, chunk_elems(x3.device) // per_row)
    n = min(R, step) * per_row
    dev = x3.device
    tmp = scratch(n, dev, 0)
    direct = out3.dtype == torch.float32
    buf = None if direct else scratch(n, dev, 1)
    for i in range(0, R, step):
        j = min(i + step, R)
        xc = x3[i:j]
        t = tmp[: xc.numel()]
        if fused:
            sc, ec = scale_from_amax(group_absmax(xc, t), q, fmt, tensor_amax)
            s3[i:j] = sc
            if ec is not None:
                e3[i:j] = ec
        else:
            sc = s3[i:j] if s3.shape[0] > 1 else s3
            ec = None if e3 is None else (e3[i:j] if e3.shape[0] > 1 else e3)
        a = out3[i:j] if direct else buf[: xc.numel()].view(xc.shape)
        # scale and round in fp32. A bf16 input is first copied (exactly) into the fp32 buffer: torch's
        # mixed-dtype broadcast div/mul takes a slow path with temporaries (measured 3-6x the whole fp32 quantizer)
        src = xc if xc.dtype == torch.float32 else a.copy_(xc)
        torch.div(src, sc, out=a) if ec is None else torch.mul(src, ec, out=a)
        round_to_grid_(a.view(-1), fmt, t, q.rounding, generator, saturate)
        if fmt.has_inf and saturate:  # e5m2 keeps ±inf (the clamp made it ±max)
            torch.where(xc.isinf(), xc.float(), a, out=a)
        if direct:
            if dequant:
                a.mul_(sc)
        elif dequant:
            out3[i:j].copy_(a.mul_(sc))  # the fp32 product, rounded once to the output dtype
        else:
            out3[i:j].copy_(a)


def _four_over_six(x3, q, fmt, generator, out3, dequant):
    """NVFP4 with "4 over 6" (whole tensor, not chunked): per group, the candidate (block max to 6, or
    to 4 via the block scale ×1.5) with the smaller squared error. Returns the chosen scales [R, G, 1]."""
    if q.granularity == "tensor":  # one group: the whole tensor
        x3, out3 = x3.reshape(1, 1, -1), out3.view(1, 1, -1)
    amax = absmax3(x3, q) if q.granularity != "tensor" else absmax3(x3, TensorQuant(q.fmt, "row"))
    t = absmax3(x3, TensorQuant(q.fmt, "tensor")).view(())
    x = x3.float()
    best = err = s_best = None
    for mult in (1.0, 1.5):
        s, _ = scale_from_amax(amax * mult, q, fmt, t, block_max=E4M3_MAX_4OVER6)
        v = round_to_grid_(x / s, fmt, torch.empty_like(x), q.rounding, generator)
        e = tree_sum((v * s - x).square_(), 2)
        if q.granularity == "block":  # the error of the whole square block
            R, G, _ = e.shape
            e = tree_sum(e.view(R // q.block, q.block, G), 1).expand(-1, q.block, -1).reshape(R, G, 1)
        if best is None:
            best, err, s_best = v, e, s
        else:  # ties keep "max to 6"
            pick = e < err
            best, s_best = torch.where(pick, v, best), torch.where(pick, s, s_best)
    out3.copy_(best * s_best if dequant else best)
    return s_best


# --- an opaque op for torch.compile (lowbit.quant_op) --------------------------------------

def _opaque(x, q, generator, amax, dequant, transposed):
    """The custom op's call for _run_keyed's arguments (round-to-nearest, or SR from a Stream: its seed)."""
    a = amax if amax is None or isinstance(amax, torch.Tensor) else \
        torch.tensor(float(amax), dtype=torch.float32, device=x.device)
    sr = q.rounding == "stochastic"  # the call's stream as (call index, layer, path): derived inside the op
    return _QUANTIZE_OP(x, q.fmt, q.granularity, q.block, q.scale_fmt, q.scale_round, q.reciprocal, q.scale_rule,
                        q.scale_mult, a, dequant, q.rounding, q.four_over_six, generator.call if sr else None,
                        generator.layer if sr else 0, list(generator.path) if sr else [], transposed)


def _saturates(q: TensorQuant, amax) -> bool:
    """Whether rounding must clamp to ±max first. With fp32 current scaling by division |x / s| <= max·(1 + 2^-22)
    (or the group is NaN), which rounds to at most max: the clamp can be skipped."""
    return not (q.scale_fmt == "fp32" and amax is None and not q.reciprocal and q.scale_mult >= 1)


def _scaled_pass(x3, shape, q, fmt, amax, saturate, out, dequant):
    """(out, scales): x3's eager scales, then the Triton pass writing out (x's shape: fake-quantized values with
    dequant, else fp32 rounded values, or FP8 codes when out is uint8)."""
    s3, e3 = scales3(x3, q, fmt, amax)
    kernels.run_scaled(x3, s3, e3, fmt, saturate, out.view(x3.shape), dequant)
    return out, group_scales(s3, shape, q)


def _run(x, q, generator, amax, dequant, transposed=False):
    """(fake-quantized x or its fp32 rounded values, the decode scales): every quantizer's one entry point. A
    layer's Stream gives each stochastic quantizer call a child stream (lowbit.rng.Stream.child). transposed: x
    is a 2-D b standing for the operand b.t(), and the values come back in b's layout (the scales are b.t()'s)."""
    _check_q(q)
    check_float(x)
    if q.rounding == "stochastic" and isinstance(generator, Stream):
        generator = generator.child()
    return _run_keyed(x, q, generator, amax, dequant, transposed)


def _run_keyed(x, q, generator, amax, dequant, transposed=False):
    """_run once the call's random stream is settled; under torch.compile the opaque op (lowbit.quant_op)."""
    if _QUANTIZE_OP is not None and torch.compiler.is_compiling() and (
            q.rounding == "nearest" or (isinstance(generator, Stream) and generator.call is not None)):
        return _opaque(x, q, generator, amax, dequant, transposed)
    if transposed:  # the kernels read the transposed view in place and write it transposed: no copy either way
        out, scales = _run_keyed(x.t(), q, generator, amax, dequant)
        return out.t(), scales
    fmt = get_format(q.fmt)
    if q.rounding == "stochastic" and generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}; "
                         f"create it with torch.Generator(device={str(x.device)!r})")
    saturate = _saturates(q, amax)
    if x.numel() and kernels.applies(x, q, amax, dequant):  # (amax beyond granularity "tensor": eager raises)
        return kernels.run(x, q, fmt, generator, amax, dequant, saturate)
    xc = x.contiguous()
    x3 = as3d(xc, q)
    out = empty(x.shape, x.dtype if dequant else torch.float32, x.device)
    if x.numel() == 0:
        return out, torch.empty(scale_shape(x.shape, q), dtype=torch.float32, device=x.device)
    if q.four_over_six:
        if amax is not None:
            raise ValueError("four_over_six takes its scales from the current tensor; drop amax= "
                             "(delayed scaling) or set four_over_six=false")
        return out, group_scales(_four_over_six(x3, q, fmt, generator, out.view(x3.shape), dequant), x.shape, q)
    if kernels.scaled_applies(x, q):  # CUDA: the scales as below, then one Triton pass over the elements
        return _scaled_pass(x3, x.shape, q, fmt, amax, saturate, out, dequant)
    fused = q.granularity in ("row", "tile") and amax is None and q.scale_rule == "absmax"
    tensor_amax = None
    if fused:
        s3 = torch.empty((x3.shape[0], x3.shape[1], 1), dtype=torch.float32, device=x.device)
        e3 = torch.empty_like(s3) if q.reciprocal else None
        if q.scale_fmt == "e4m3":  # NVFP4's tensor-level scale needs the global absmax first
            tensor_amax = absmax3(x3, TensorQuant(q.fmt, "tensor")).view(())
    else:
        s3, e3 = scales3(x3, q, fmt, amax)
    _kernel(x3, s3, e3, q, fmt, generator, saturate, out.view(x3.shape), dequant, fused, tensor_amax)
    return out, group_scales(s3, x.shape, q)


def fake_quantize(x: torch.Tensor, q: TensorQuant, generator: torch.Generator | None = None,
                  amax=None) -> torch.Tensor:
    """Quantize-dequantize x under q: same shape and dtype as x (fp32/bf16/fp16, any device).

    generator: for q.rounding == "stochastic" (on x's device). amax: scalar absmax to use
    instead of the measured one (granularity "tensor" only; values beyond it saturate).
    Raises ValueError when the last dim (or, for "block", the rows) is not divisible by q.block.
    """
    return _run(x, q, generator, amax, dequant=True)[0]


def fake_quantize_with_scales(x: torch.Tensor, q: TensorQuant, generator: torch.Generator | None = None,
                              amax=None, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake_quantize(x, q, generator, amax), the decode scales it used: absmax_scale's shape). transposed: x is a
    2-D b standing for b.t(), whose values come back in b's layout (under torch.compile: no copy into and out of
    the opaque op) with the scales of b.t()."""
    return _run(x, q, generator, amax, dequant=True, transposed=transposed)


kernels.set_reference(fake_quantize_with_scales)  # what the GPU kernels are checked against on first use
_QUANTIZE_OP = register_quantize_op(_run_keyed)  # None where this torch cannot register it


def divide_by_scales(x: torch.Tensor, q: TensorQuant, scales: torch.Tensor) -> torch.Tensor:
    """x / the scale of its group (fp32, x's shape), `scales` in absmax_scale's shape for x."""
    x3 = as3d(x.contiguous(), q)
    return (x3.float() / rows_scales(scales, x3, q)).view(x.shape)


def scaled_values(x: torch.Tensor, q: TensorQuant, amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale as fp32 of x's shape, scale as from absmax_scale): the scaled,
    not yet rounded values (what DGE evaluates f' on)."""
    if x.numel():
        s3, e3 = scale_factors(x.contiguous(), q, amax)  # (checks q and x)
        x3 = as3d(x.contiguous(), q)
        xs = (x3.float() / s3 if e3 is None else x3.float() * e3).view(x.shape)
        return xs, group_scales(s3, x.shape, q)
    _check_q(q)
    check_float(x)
    return (torch.empty(x.shape, dtype=torch.float32, device=x.device),
            torch.empty(scale_shape(x.shape, q), dtype=torch.float32, device=x.device))


def scale_factors(x: torch.Tensor, q: TensorQuant, amax=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(decode scales, encode factors or None), fp32 [R|1, G, 1] over the groups of as3d(x, q) (x contiguous,
    non-empty): scaled_values(x) is x3.float() / scales, or x3.float() · factors where the rule multiplies."""
    _check_q(q)
    check_float(x)
    return scales3(as3d(x, q), q, get_format(q.fmt), amax)


# --- quantize / dequantize -----------------------------------------------------------------

@dataclass
class QTensor:
    """A quantized tensor.

    codes:  uint8. FP8 (e4m3/e5m2): one code per element, shape = `shape`, the bit
            pattern of torch's float8_e4m3fn / float8_e5m2. 4-bit (e2m1/e1m2/e3m0): two
            codes per byte along the last dim (element 2i in the low nibble, 2i+1 in the
            high nibble; an odd last dim is padded with a zero code), shape
            [..., ceil(C/2)]; code = sign << 3 | magnitude index into fmt.values().
            These formats have no NaN: lowbit stores NaN in the otherwise redundant
            negative-zero code 0b1000, so a NaN survives dequantize (-0.0 is stored as +0).
    scales: fp32 effective scales (shapes: module docstring).
    shape, dtype: of the original tensor; q: how it was quantized.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    q: TensorQuant
    dtype: torch.dtype = torch.float32


_FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def quantize(x: torch.Tensor, q: TensorQuant, generator: torch.Generator | None = None,
             amax=None) -> QTensor:
    """Quantize x under q into codes and scales; dequantize(quantize(x)) equals
    fake_quantize(x) exactly (same generator state for stochastic rounding)."""
    direct = _triton_codes(x, q, amax) if q.rounding == "nearest" else None
    if direct is not None:  # CUDA: the codes written by the Triton kernel itself
        return QTensor(direct[0], direct[1], x.shape, q, x.dtype)
    v, scales = _run(x, q, generator, amax, dequant=False)  # signed rounded values, fp32
    v = v.contiguous()  # the compiled kernels return a transposed view for a transposed x
    fmt = get_format(q.fmt)
    if q.fmt in _FP8_DTYPES:  # exact: v is on the format's grid and within its range
        codes = v.to(_FP8_DTYPES[q.fmt]).view(torch.uint8)
    else:
        codes = pack4(encode4(v, fmt))
    return QTensor(codes, scales, x.shape, q, x.dtype)


def _triton_codes(x: torch.Tensor, q: TensorQuant, amax):
    """(FP8 codes, scales) of a CUDA tensor from the Triton kernels (fused, or eager scales and one pass), or None
    where they do not apply."""
    if q.fmt not in _FP8_DTYPES or not x.numel() or x.device.type != "cuda" or torch.compiler.is_compiling():
        return None
    fmt, sat = get_format(q.fmt), _saturates(q, amax)
    if kernels.applies(x, q, amax, dequant=False):
        return kernels.run_codes(x, q, fmt, amax, sat)
    if not q.four_over_six and kernels.scaled_applies(x, q):
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        return _scaled_pass(as3d(x.contiguous(), q), x.shape, q, fmt, amax, sat, out, False)
    return None


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values · scales, in `dtype` (default: the original tensor's dtype)."""
    q = qt.q
    fmt = get_format(q.fmt)
    if q.fmt in _FP8_DTYPES:
        v = qt.codes.view(_FP8_DTYPES[q.fmt]).float()
    else:
        v = decode4(unpack4(qt.codes, qt.shape), fmt)
    out = torch.empty(qt.shape, dtype=torch.float32, device=qt.codes.device)
    if out.numel():
        x3 = as3d(out, q)
        torch.mul(v.view(x3.shape), rows_scales(qt.scales, x3, q), out=x3)
    return out.to(dtype or qt.dtype)


# --- statistics ----------------------------------------------------------------------------

def underflow_fraction(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Fraction (0-d fp32) of the nonzero entries of x that became zero in xq
    (e.g. xq = fake_quantize(x, q)); 0 when x has no nonzero entries."""
    nz = x != 0
    n = nz.sum()
    lost = (nz & (xq == 0)).sum()
    return (lost.float() / n.clamp_min(1).float())
