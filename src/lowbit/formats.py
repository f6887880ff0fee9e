"""Number formats and the cast onto their grids (simulated, in fp32 arithmetic).

Formats (magnitudes; every low-bit format is sign-magnitude except E8M0):

    name   ebits mbits bias  max        min_normal  min_subnormal  inf  NaN
    e2m1   2     1     1     6          1           0.5            no   no    FP4: 0 .5 1 1.5 2 3 4 6
    e1m2   1     2     0     3.5        2           0.5            no   no    FP4: 0 .5 1 ... 3.5 (uniform)
    e3m0   3     0     3     16         0.25        0.25           no   no    FP4: 0 .25 .5 1 2 4 8 16
    e4m3   4     3     7     448        2^-6        2^-9           no   yes   OCP FP8 "fn" (S.1111.111 = NaN)
    e5m2   5     2     15    57344      2^-14       2^-16          yes  yes   OCP/IEEE-like FP8
    e8m0   8     0     127   2^127      2^-127      2^-127         no   yes   unsigned, no zero (MX scales)
    bf16 / fp16 / fp32: IEEE pass-through via torch's own conversion (RNE; finite overflow
    becomes inf, as in real bf16/fp16 arithmetic, not saturated); stochastic rounding for bf16.

E1M2 and E3M0 (the FP4 paper's layout ablation) follow the IEEE conventions of
E2M1: bias 2^(ebits-1) - 1, exponent field 0 holds the subnormals, and every
code is finite (no inf/NaN). E3M0 has no mantissa, so it has no subnormals
besides zero. With absmax scaling only the *shape* of the grid matters (the
group absmax is mapped onto `max`), so the bias only shows with power-of-two
(E8M0) scales.

`cast(x, fmt)` semantics (low-bit formats e2m1 ... e5m2):
  * finite values round to the nearest grid value, ties to even code
    (round-to-nearest-even), subnormals included. E3M0 has no mantissa bit, so
    "even" is taken on the step grid as the hardware rounding does: a tie
    between 2^e and 2^(e+1) goes up (like torch's float8_e8m0fnu cast), the tie
    between 0 and the smallest value 0.25 goes to 0;
  * |x| > max saturates to ±max (torch 2.13's CPU float8_e4m3fn cast also
    saturates, but its float8_e5m2 cast overflows to inf, and other torch
    versions/backends give NaN for e4m3fn: lowbit saturates both, everywhere);
  * ±inf -> ±max for formats without inf; e5m2 keeps ±inf;
  * NaN stays NaN, also for E2M1/E1M2/E3M0 which have no NaN code: keeping it
    in the simulated tensor makes bugs surface instead of hiding them;
  * signed zero is kept (-0.0 -> -0.0).
E8M0 (a scale format): positive values round to the nearest power of two in
[2^-127, 2^127], the midpoint 1.5·2^k rounding up (as torch's float8_e8m0fnu
does); 0 and tiny values -> 2^-127, larger ones and +inf -> 2^127, negative
values and NaN -> NaN (no sign bit).
The result has x's dtype. Every E2M1/E1M2/E3M0/E4M3 value is exact in
bf16/fp16; E5M2's range fits fp16 (max 65504) and bf16; E8M0 values outside
fp16's range become inf/0 in an fp16 result (use fp32 or bf16 for scales).

Implementation (why it is fast): the rounding works in place on fp32 chunks
small enough to stay in cache. For a magnitude a, let e = max(floor(log2 a),
emin) (an exponent-field mask and a clamp); with c = 2^(e + 23 - mbits) the
fp32 sum a + c has an ulp equal to the format's step at a, so the hardware's
own round-to-nearest-even does the rounding and (a + c) - c is the result,
subnormals included (c = 1.5·2^(...) makes it work for both signs; see round_to_grid_).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.rng import random_bits16, uniform

ROUNDINGS = ("nearest", "stochastic")
# Elements per chunk of the elementwise passes. On CPU a 4 MiB fp32 chunk stays in the last-level
# cache across the ~9 in-place passes while keeping the per-op dispatch overhead (~8 us) small; on
# accelerators chunking only bounds the scratch memory.
_CHUNK_CPU = 1 << 20
_CHUNK_ACCEL = 1 << 24


def chunk_elems(device: torch.device) -> int:
    return _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCEL


_MADV_HUGEPAGE = 14
_THP_MIN_BYTES = 8 << 20


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, plus (Linux CPU, >= 8 MiB) a transparent-huge-page hint for the buffer.

    Why: a fresh CPU buffer above glibc's mmap threshold is mapped page by page on first
    write; for a 64 MiB output that is 16k page faults, ~25 ms on a 2-core VM, more than the
    whole quantizer. madvise(MADV_HUGEPAGE) (what torch itself does under THP_MEM_ALLOC_ENABLE=1)
    maps it in 2 MiB pages instead. A pure performance hint: the values are unaffected, and
    where the hint is unavailable the buffer is simply an ordinary torch.empty.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and nbytes >= _THP_MIN_BYTES and _madvise is not None:
        start = (t.data_ptr() + (1 << 21) - 1) & ~((1 << 21) - 1)
        end = (t.data_ptr() + nbytes) & ~((1 << 21) - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)
    return t


def _load_madvise():
    import sys
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        f = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


_madvise = _load_madvise()


@dataclass(frozen=True)
class Format:
    """A floating-point number format. `max`, `min_normal`, `min_subnormal`
    are magnitudes; `min_subnormal` is the smallest positive value."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    has_nan: bool
    signed: bool = True
    passthrough: bool = False  # bf16/fp16/fp32: torch's own conversion

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """floor(log2(max)), the exponent of the largest value (OCP MX's emax_elem)."""
        return math.floor(math.log2(self.max))

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    def values(self) -> torch.Tensor:
        """Sorted 1-D float64 tensor of all non-negative finite values, in code
        order (index i is magnitude code i). Only for formats of <= 16 bits."""
        if self.bits > 16:
            raise ValueError(f"{self.name} has 2^{self.bits} codes; values() is for formats of at most 16 bits")
        codes = torch.arange(1 << (self.ebits + self.mbits), dtype=torch.float64)
        e = torch.floor(codes / (1 << self.mbits))
        m = codes - e * (1 << self.mbits)
        if self.name == "e8m0":  # no subnormals, no zero
            v = torch.exp2(e - self.bias)
        else:
            frac = m / (1 << self.mbits)
            v = torch.where(e == 0, frac * 2.0 ** self.emin, (1 + frac) * torch.exp2(e - self.bias))
        return v[v <= self.max]


def _ieee(name, ebits, mbits, has_inf, has_nan, max_value=None, bias=None):
    bias = (1 << (ebits - 1)) - 1 if bias is None else bias
    emin = 1 - bias
    if max_value is None:  # all exponent codes are finite numbers
        max_value = (2 - 2.0 ** -mbits) * 2.0 ** ((1 << ebits) - 1 - bias)
    return Format(name, ebits, mbits, bias, float(max_value), 2.0 ** emin,
                  2.0 ** (emin - mbits) if mbits else 2.0 ** emin, has_inf, has_nan)


FORMATS: dict[str, Format] = {
    "e2m1": _ieee("e2m1", 2, 1, False, False),
    "e1m2": _ieee("e1m2", 1, 2, False, False),
    "e3m0": _ieee("e3m0", 3, 0, False, False),
    "e4m3": _ieee("e4m3", 4, 3, False, True, max_value=448.0),
    "e5m2": _ieee("e5m2", 5, 2, True, True, max_value=57344.0),
    "e8m0": Format("e8m0", 8, 0, 127, 2.0 ** 127, 2.0 ** -127, 2.0 ** -127, False, True, signed=False),
    "bf16": Format("bf16", 8, 7, 127, float(torch.finfo(torch.bfloat16).max), 2.0 ** -126, 2.0 ** -133,
                   True, True, passthrough=True),
    "fp16": Format("fp16", 5, 10, 15, 65504.0, 2.0 ** -14, 2.0 ** -24, True, True, passthrough=True),
    "fp32": Format("fp32", 8, 23, 127, float(torch.finfo(torch.float32).max), 2.0 ** -126, 2.0 ** -149,
                   True, True, passthrough=True),
}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def get_format(name: "str | Format") -> Format:
    """Look up a format by name ("e2m1", "e1m2", "e3m0", "e4m3", "e5m2", "e8m0", "bf16", "fp16", "fp32")."""
    if isinstance(name, Format):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown number format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_float(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}; convert it with .float()")


def _check_rounding(rounding, generator, device):
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the tensor is on {device}; "
                         f"create it with torch.Generator(device={str(device)!r})")


def round_to_grid_(a: torch.Tensor, fmt: Format, tmp: torch.Tensor, rounding: str = "nearest",
                   generator: torch.Generator | None = None, saturate: bool = True) -> torch.Tensor:
    """Round fp32 values onto fmt's (signed) grid, in place.

    a:   fp32, any sign, NaN allowed (stays NaN). Zeros come out as +0 (callers that keep the
         sign of zero copysign afterwards).
    tmp: fp32 scratch of a's shape (overwritten); lets callers reuse one buffer.
    saturate: clamp to ±fmt.max first (inf -> ±max); may be skipped when the caller guarantees
        |a| <= max·(1 + 2^-22), as absmax scaling does.
    For a low-bit format (not e8m0, not pass-through). Returns a.
    """
    if saturate:
        a.clamp_(-fmt.max, fmt.max)  # propagates NaN
    # tmp = 2^max(floor(log2 |a|), emin): a's exponent bits (no sign), clamped below at emin, where
    # the subnormal step begins.
    torch.bitwise_and(a.view(torch.int32), 0x7F800000, out=tmp.view(torch.int32))
    tmp.clamp_min_(fmt.min_normal)
    if rounding == "nearest":
        # c = 1.5·2^(e + 23 - mbits): for |a| <= 2^(e+1), c + a stays in c's binade, whose fp32 ulp is
        # the format's step at a, so the FPU's round-to-nearest-even rounds a onto the grid (ties to an
        # even multiple of the step, for either sign: c / step = 3·2^22 is even); subtracting c is exact.
        k = 1.5 * 2.0 ** (23 - fmt.mbits)
        a.add_(tmp, alpha=k).sub_(tmp, alpha=k)
    else:
        # floor(a/step + u)·step, u ~ U[0, 1): rounds up with probability frac(a/step), so E[result] = a.
        tmp.mul_(2.0 ** -fmt.mbits)  # the step at a (exact power of two)
        a.div_(tmp)
        a.add_(uniform(a.numel(), a.device, generator).view(a.shape)).floor_().mul_(tmp)
    return a


def cast(x: torch.Tensor, fmt: "str | Format", rounding: str = "nearest",
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Round x onto fmt's grid (see the module docstring for the exact rules).

    x: float32/bfloat16/float16 tensor of any shape, any device. Returns a new
    tensor of x's shape and dtype. rounding="stochastic" rounds up with
    probability equal to the distance from the lower grid point over the step
    (unbiased), drawing from `generator` (on x's device) if given.
    """
    fmt = get_format(fmt)
    check_float(x)
    _check_rounding(rounding, generator, x.device)
    if fmt.passthrough:
        return _cast_passthrough(x, fmt, rounding, generator)
    if fmt.name == "e8m0":
        if rounding != "nearest":
            raise ValueError("stochastic rounding to e8m0 is not supported; e8m0 is a scale format, use 'nearest'")
        return _cast_e8m0(x)
    out = empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out
    xf = x.contiguous().view(-1)
    of = out.view(-1)
    n = xf.numel()
    chunk = chunk_elems(x.device)
    size = min(n, chunk)
    tmp = torch.empty(size, dtype=torch.float32, device=x.device)
    buf = None if x.dtype == torch.float32 else torch.empty(size, dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        xc = xf[i:j]
        a = of[i:j] if x.dtype == torch.float32 else buf[: j - i]
        a.copy_(xc)
        round_to_grid_(a, fmt, tmp[: j - i], rounding, generator)
        if fmt.has_inf:  # e5m2 keeps ±inf (the clamp turned it into ±max)
            a.masked_fill_(xc.isinf(), math.inf)
        a.copysign_(xc)  # the sign of zero, and of values that round to zero
        if x.dtype != torch.float32:
            of[i:j].copy_(a)
    return out


def _cast_passthrough(x, fmt, rounding, generator):
    dtype = _TORCH_DTYPES[fmt.name]
    if rounding == "nearest":
        return x.to(dtype).to(x.dtype)
    if fmt.name != "bf16":
        raise ValueError(f"stochastic rounding is implemented for the low-bit formats and bf16, not {fmt.name}")
    # bf16 keeps the top 16 bits of the fp32 pattern: add uniform random low bits, then truncate.
    # Works on sign-magnitude patterns for either sign; NaN stays NaN; can overflow to inf like bf16 itself.
    b = x.float().contiguous().view(torch.int32)
    r = random_bits16(b.numel(), x.device, generator).view(b.shape)
    finite = torch.isfinite(x)
    b = torch.where(finite, (b + r) & ~0xFFFF, b)
    return b.view(torch.float32).to(torch.bfloat16).to(x.dtype)


def _cast_e8m0(x):
    a = x.float()
    m, e = torch.frexp(a)  # a = m·2^e, m in [0.5, 1)
    p = (e - 1 + (m >= 0.75).to(e.dtype)).clamp(-127, 127)
    y = torch.ldexp(torch.ones_like(a), p)
    y = torch.where(a > 0, y, torch.full_like(a, 2.0 ** -127))
    y = torch.where(a == math.inf, torch.full_like(a, 2.0 ** 127), y)
    y = torch.where((a < 0) | a.isnan(), torch.full_like(a, math.nan), y)
    return y.to(x.dtype)
