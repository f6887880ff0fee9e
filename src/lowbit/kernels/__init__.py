"""Fused quantization kernels: one pass over the tensor per quantizer, bit for bit the eager quantizers.

The eager quantizers (lowbit.quant, lowbit.scales, lowbit.formats) are the specification; a kernel here
replaces one where it applies and is tested equal to it (tests/test_kernels.py). Which runs:

    LOWBIT_KERNELS=auto    (default) the compiled CPU kernels for CPU tensors where they build, else eager
    LOWBIT_KERNELS=eager   always the eager PyTorch code
    LOWBIT_KERNELS=cpu     the compiled CPU kernels; an error where they cannot be built (GPU tensors: eager)
    LOWBIT_KERNELS=triton  the Triton kernel for GPU tensors, an error where triton cannot be imported (CPU
                           tensors: as auto)

Covered: every format (E2M1, E1M2, E3M0, E4M3, E5M2), granularity (tensor, row, 1×N tile, N×N block) and
absmax scale rule (fp32 divide or reciprocal, E8M0 floor or ceil, NVFP4's two-level E4M3 × fp32, the scale
multiplier), round-to-nearest-even and stochastic rounding (the same counter-hash random numbers as
lowbit.rng), fp32/bf16/fp16 in and out, along rows or (for a transposed view) along columns; beside them OCC
per token with its sparse residual's products (occ.py), DGE's factor on dW, a sampled step's statistics, and NVFP4's "4 over 6" on
tiles and square blocks of 2..64 (a power of two; fos.c), QuEST's σ scales on such tiles (quest.c), the Hadamard
rotations (rotate.c, rotation.py). Not covered (eager): "4 over 6" per row or tensor; on GPUs (lowbit.kernels.triton_quant) stochastic rounding and the rules
docs/gpu.md lists. Under torch.compile the opaque op lowbit::quantize calls them.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading

import torch

from lowbit.formats import Format, chunk_elems, empty
from lowbit.groups import as3d, check_divisible, scale_shape
from lowbit.rng import draw_key
from lowbit.scales import E4M3_MAX, E4M3_MAX_4OVER6, QUEST_CLIP
from lowbit.tensor_quant import TensorQuant

MODES = ("auto", "eager", "cpu", "triton")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SCALE_FMTS = {"fp32": 0, "e8m0": 1, "e4m3": 2}


_MODE: list = [None, "auto"]  # [the raw LOWBIT_KERNELS last parsed, its mode]: asked several times per quantizer


def mode() -> str:
    """The LOWBIT_KERNELS setting (default "auto"); ValueError naming the choices for anything else."""
    raw = os.environ.get("LOWBIT_KERNELS")
    if raw == _MODE[0]:
        return _MODE[1]
    m = (raw or "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"LOWBIT_KERNELS={m!r} is not one of {', '.join(MODES)}; unset it for 'auto'")
    _MODE[:] = [raw, m]
    return m


def cpu_library():
    """The compiled CPU kernel library under LOWBIT_KERNELS (None: eager; RuntimeError for "cpu" without it).
    None while dynamo traces: the kernels run inside opaque ops there, and the loader's lock would break the graph."""
    if torch.compiler.is_compiling():
        return None
    from lowbit.kernels import cpu
    m = mode()
    if m == "eager":
        return None
    lib = cpu.library()
    if lib is None and m == "cpu":
        raise RuntimeError(f"LOWBIT_KERNELS=cpu but the CPU kernels are unavailable: {cpu.why()}; "
                           "install gcc (or set $CC) or set LOWBIT_KERNELS=auto")
    return lib


def _triton():
    """lowbit.kernels.triton_quant, or None where triton is not importable (LOWBIT_KERNELS=triton: an error)."""
    m = mode()
    if m in ("eager", "cpu") or _EAGER_ONLY:
        return None
    try:
        from lowbit.kernels import triton_quant
    except ImportError as e:
        if m == "triton":
            raise RuntimeError(f"LOWBIT_KERNELS=triton but triton cannot be imported ({e}); install the CUDA build of "
                               "torch (it ships triton) or set LOWBIT_KERNELS=auto") from e
        return None
    return triton_quant


_EAGER_ONLY: list = []  # non-empty while the self-check computes its eager reference


@contextlib.contextmanager
def eager_only():
    """Within: every quantizer runs the eager code (the GPU self-check's reference)."""
    _EAGER_ONLY.append(1)
    try:
        yield
    finally:
        _EAGER_ONLY.pop()
_REFERENCE: list = []  # [lowbit.quant.fake_quantize_with_scales], registered by lowbit.quant (no import cycle)


def set_reference(fn) -> None:
    """Register the eager quantizer the GPU self-check compares against (lowbit.quant does, on import)."""
    _REFERENCE[:] = [fn]
_GPU_CHECKED: dict[str, str | None] = {}  # device -> None (passed) or why the Triton kernels are off there


def _gpu_self_check(device: torch.device) -> bool:
    """On a device's first use: the Triton kernels against the eager quantizer on a small tensor with NaN, inf,
    zeros and ties, bit for bit: the fused ones directly, the elementwise one through lowbit.quant (rules whose
    scales stay eager). A mismatch or an error turns them off on that device, said once (a new GPU, driver or
    Triton version must not silently change a run's numbers)."""
    key = str(device)
    if key not in _GPU_CHECKED:
        _GPU_CHECKED[key] = None  # while checking: the public path below may ask again
        try:
            from lowbit.kernels.gpu_check import compare_on
            why = compare_on(device, _REFERENCE[0], run_triton, eager_only)
        except Exception as e:  # noqa: BLE001 -- any Triton or driver failure: eager is always available
            why = f"they failed ({type(e).__name__}: {e})"
        _GPU_CHECKED[key] = why
        if why:
            import sys
            print(f"lowbit: the Triton quantization kernels are off on {key}: {why}; using the eager quantizers "
                  "(same numbers, slower)", file=sys.stderr, flush=True)
    return _GPU_CHECKED[key] is None


def which(device_type: str = "cpu") -> str:
    """Which quantizers tensors on `device_type` run in this process (for result.json): "cpu" (the compiled C
    kernels), "triton" (CUDA, where triton imports; it covers row/tile fake-quantize, eager does the rest) or
    "eager"."""
    if device_type == "cuda":  # "eager" too where the first-use self-check turned Triton off
        off = any(why for dev, why in _GPU_CHECKED.items() if dev.startswith("cuda"))
        return "triton" if _triton() is not None and not off else "eager"
    return "cpu" if device_type == "cpu" and cpu_library() is not None else "eager"


def applies(x: torch.Tensor, q: TensorQuant, amax=None, dequant: bool = True) -> bool:
    """Whether a compiled kernel computes fake_quantize/quantize of x under q (else the eager code runs): the C
    kernels on CPU, the Triton one on CUDA (row/tile groups, RNE, fp32 or E8M0-floor scales; values or codes)."""
    if torch.compiler.is_compiling():
        return False
    if x.device.type == "cuda":
        tq = _triton()
        return tq is not None and tq.applies(x, q, amax) and _gpu_self_check(x.device)
    return (x.device.type == "cpu" and x.dtype in DTYPE_CODES and _rule_ok(q, amax) and not _EAGER_ONLY
            and cpu_library() is not None and (amax is None or q.granularity == "tensor"))


def _rule_ok(q: TensorQuant, amax) -> bool:
    """Whether the CPU kernel covers q's scale rule: any absmax; "4 over 6" (tiles, square blocks) and QuEST (tiles)
    on 2..64 elements, a power of two (the eager code's pairwise sums), current scales."""
    b = q.block or 0
    pow2 = 2 <= b <= 64 and b & (b - 1) == 0
    if q.scale_rule == "quest":
        return q.granularity == "tile" and pow2 and not q.four_over_six and amax is None
    return not q.four_over_six or (q.granularity in ("tile", "block") and amax is None and pow2)


def scaled_applies(x: torch.Tensor, q: TensorQuant) -> bool:
    """Whether, once lowbit.quant has the scales (eagerly: any rule, granularity, delayed amax), one Triton pass
    does the elements (CUDA, round-to-nearest, fp32/bf16, not 4-over-6)."""
    if torch.compiler.is_compiling() or x.device.type != "cuda":
        return False
    tq = _triton()
    return tq is not None and tq.scaled_applies(x, q) and _gpu_self_check(x.device)


def run_scaled(x3: torch.Tensor, s3: torch.Tensor, e3, fmt: Format, saturate: bool, out3: torch.Tensor,
               dequant: bool) -> torch.Tensor:
    """out3 = round(x3 / s3) (· s3 if dequant) for x3 [R, G, B], s3/e3 [R|1, G, 1]: lowbit.quant's elementwise
    kernel as one Triton pass."""
    return _triton().quantize_scaled(x3, s3, e3, fmt, saturate, out3, dequant)


def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of a contiguous CPU tensor as a 0-d fp32 tensor (NaN if x holds NaN), in one pass."""
    v = cpu_library().lb_absmax(x.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], torch.get_num_threads())
    return torch.tensor(v, dtype=torch.float32)


_PARAMS = threading.local()  # per thread (a ctypes call releases the GIL): round-to-nearest Params by their key


def _params(q: TensorQuant, fmt: Format, x, out, saturate, dequant, generator, nchunks, chunk_rows,
            tensor_amax=None):
    """(lb_params for one kernel call, its random keys: they must outlive the call). Round-to-nearest calls reuse
    one struct per (quantizer, dtypes, chunking, threads) with this call's tensor amax written in: building the
    ctypes struct cost more than the kernel on small operands."""
    amax = math.nan if tensor_amax is None else float(tensor_amax)
    sr = q.rounding == "stochastic"
    key = None if sr else (q, fmt.name, saturate, dequant, x.dtype, out.dtype, chunk_rows, torch.get_num_threads())
    cache = _PARAMS.__dict__.setdefault("by_key", {})
    if key in cache:
        p, keys = cache[key]
        p.tensor_amax = amax
        return p, keys
    from lowbit.kernels.cpu import Params
    keys = (ctypes.c_int32 * max(nchunks, 1))()
    if sr:  # one key per chunk, drawn in order, as rng.uniform draws them
        for i in range(nchunks):
            keys[i] = draw_key(generator)
    p = Params(mbits=fmt.mbits, has_inf=int(fmt.has_inf), saturate=int(saturate),
               stochastic=int(q.rounding == "stochastic"), dequant=int(dequant), emax=fmt.emax,
               fmax=fmt.max, min_normal=fmt.min_normal, scale_fmt=_SCALE_FMTS[q.scale_fmt],
               reciprocal=int(q.reciprocal), ceil_round=int(q.scale_round == "ceil"),
               has_mult=int(q.scale_mult != 1.0), scale_mult=q.scale_mult,
               tensor_amax=amax, block_max=E4M3_MAX_4OVER6 if q.four_over_six else E4M3_MAX,
               keys=keys, chunk_rows=chunk_rows, nthreads=torch.get_num_threads(),
               in_dtype=DTYPE_CODES[x.dtype], out_dtype=DTYPE_CODES[out.dtype], quest=int(q.scale_rule == "quest"),
               quest_c=QUEST_CLIP / fmt.max)
    if key is not None:
        if len(cache) > 256:  # shapes come and go (evaluation, odd batches): keep it bounded
            cache.clear()
        cache[key] = (p, keys)
    return p, keys


def run(x: torch.Tensor, q: TensorQuant, fmt: Format, generator, amax, dequant: bool, saturate: bool):
    """(fake-quantized x (dequant) or its rounded fp32 values, the decode scales): quant._run's work, bit for
    bit. A transposed 2-D view x = b.t() of a contiguous b is quantized along b's columns without the
    transposed copy; the output is then also a transposed view (same values, same scales)."""
    odt = x.dtype if dequant else torch.float32
    if x.device.type == "cuda":  # applies() admitted it: Triton
        return run_triton(x.contiguous(), q, fmt, amax, saturate, dequant)
    if _transposed(x, q) and not q.four_over_six:
        return _run_cols(x, q, fmt, generator, dequant, saturate, odt)
    xc = contiguous_2d(x) if x.dim() == 2 else x.contiguous()  # "4 over 6" has no column kernel
    x3 = as3d(xc, q)
    out = empty(x.shape, odt, x.device)
    chunk_rows = max(1, chunk_elems(x.device) // max(1, x3[0].numel()))  # the eager chunks: same random keys
    if q.granularity == "tensor":
        return out, quantize_tensor(xc, out, q, fmt, generator, amax, saturate, dequant, chunk_rows)
    scales = quantize_groups(x3, out, q, fmt, generator, saturate, dequant, chunk_rows)
    if q.granularity == "block":
        return out, scales.view(scales.shape[0], 1, scales.shape[1], 1)
    return out, scales.view(scale_shape(x.shape, q))


def run_triton(x: torch.Tensor, q: TensorQuant, fmt: Format, amax, saturate: bool, dequant: bool = True,
                codes: bool = False):
    """(fake-quantized x, or its rounded fp32 values without dequant, or their FP8 codes (uint8) with codes;
    the decode scales) from the fused Triton kernels, for x contiguous on a GPU (triton_quant.quantize)."""
    return _triton().quantize(x, q, fmt, amax, saturate, dequant, codes)


def contiguous_2d(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous() for a 2-D tensor; a transposed view b.t() of a contiguous b (1-, 2- or 4-byte elements) by
    one tiled Triton pass on GPUs (torch's strided copy: ~600 GB/s for bf16, ~160 GB/s for FP8 codes on an H200)
    and (2- or 4-byte) by 16x16 register tiles in C on CPU (torch's: ~10x a plain copy for bf16); torch's copy
    elsewhere and under torch.compile (inductor tiles it). The same bits either way."""
    if (t.device.type == "cuda" and t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()
            and t.element_size() in (1, 2, 4) and not torch.compiler.is_compiling()):
        tq = _triton()
        if tq is not None:
            return tq.transpose(t.t())
        return t.contiguous()
    lib = cpu_library() if (t.device.type == "cpu" and t.dim() == 2 and not t.is_contiguous() and min(t.shape) > 1
                            and t.t().is_contiguous() and t.element_size() in (2, 4)) else None
    if lib is not None:  # (None while dynamo traces)
        out = torch.empty(t.shape, dtype=t.dtype)
        b = t.t()  # contiguous [B, A]; out [A, B] is its transpose
        lib.lb_transpose(b.data_ptr(), t.element_size(), b.shape[0], b.shape[1], b.shape[1], out.data_ptr(),
                         torch.get_num_threads())
        return out
    return t.contiguous()


def run_codes(x: torch.Tensor, q: TensorQuant, fmt: Format, amax, saturate: bool):
    """(FP8 codes uint8 of x's shape, decode scales): quantize()'s result for a CUDA tensor applies() admits,
    written by the Triton kernel directly (no fp32 values, no cast pass)."""
    return run_triton(x.contiguous(), q, fmt, amax, saturate, dequant=False, codes=True)


def _transposed(x: torch.Tensor, q: TensorQuant) -> bool:
    """x is b.t() for a contiguous 2-D b (and not both vectors), and the column kernel takes q."""
    if x.dim() != 2 or min(x.shape) < 2 or x.stride() != (1, x.shape[0]):
        return False
    # QuEST's scales have no column kernel; tensor + SR: the random index order differs
    return q.scale_rule == "absmax" and (q.granularity != "tensor" or q.rounding == "nearest")


def _run_cols(x, q, fmt, generator, dequant, saturate, odt):
    N, M = x.shape
    b = x.t()  # contiguous [M, N]; x's rows are b's columns
    if q.granularity == "tensor":  # one scale: quantize b in its own layout
        out, s = run(b, q, fmt, generator, None, dequant, saturate)
        return out.t(), s
    if q.granularity != "row":
        check_divisible(x.shape, N, M, q)
    L = M if q.granularity == "row" else q.block
    bw = q.block if q.granularity == "block" else 1
    chunk_rows = max(1, chunk_elems(x.device) // M)  # rows of x (the eager copy's chunks)
    out = empty((M, N), odt, x.device)
    t = absmax(b) if q.scale_fmt == "e4m3" else None
    p, _keys = _params(q, fmt, b, out, saturate, dequant, generator, -(-N // chunk_rows), chunk_rows, t)
    scales = torch.empty((M // L, N // bw), dtype=torch.float32)
    _check(cpu_library().lb_quant_cols(b.data_ptr(), out.data_ptr(), M, N, L, bw, ctypes.byref(p), scales.data_ptr()))
    scales = scales.t().contiguous()  # [N / bw, M / L]: per row (block row) of x
    if q.granularity == "block":
        return out.t(), scales.view(N // bw, 1, M // L, 1)
    return out.t(), scales.view(scale_shape(x.shape, q))


def quantize_tensor(x: torch.Tensor, out: torch.Tensor, q: TensorQuant, fmt: Format, generator, amax,
                    saturate: bool, dequant: bool, chunk: int) -> torch.Tensor:
    """out = round(x / s) or round(x · e), times s if dequant, with one scale for all of contiguous CPU x, from its
    absmax or the given (delayed) amax by scales.scale_from_amax's rule: one C call (lb_quant_tensor). Returns the
    decode scale s, 0-d fp32. chunk: elements per random-key chunk (the eager kernel's chunk)."""
    a = math.nan
    if amax is not None:
        t = torch.as_tensor(amax, dtype=torch.float32)
        if t.numel() != 1:
            raise ValueError(f"amax must be a scalar (0-d tensor or float), got shape {tuple(t.shape)}")
        a = float(t.reshape(()).abs())
    n = x.numel()
    p, _keys = _params(q, fmt, x, out, saturate, dequant, generator, -(-n // chunk), chunk)
    s = torch.empty((), dtype=torch.float32)
    cpu_library().lb_quant_tensor(x.data_ptr(), out.data_ptr(), n, a, int(amax is None), ctypes.byref(p),
                                  s.data_ptr())
    return s


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("lowbit's CPU quantization kernel could not allocate its work buffers")


def quantize_groups(x3: torch.Tensor, out: torch.Tensor, q: TensorQuant, fmt: Format, generator, saturate: bool,
                    dequant: bool, chunk_rows: int) -> torch.Tensor:
    """Row/tile/block quantization of contiguous x3 [R, G, B] into out (same numel), the scales computed
    in the pass. Returns the fp32 decode scales [R / b, G] (b = q.block for "block", else 1)."""
    R, G, B = x3.shape
    brows = q.block if q.granularity == "block" else 1
    t = absmax(x3) if q.scale_fmt == "e4m3" else None  # NVFP4's tensor scale needs the global absmax first
    scales = torch.empty((R // brows, G), dtype=torch.float32)
    if q.four_over_six:  # two candidates, one key each over the whole tensor (quant._four_over_six's draws)
        p, _keys = _params(q, fmt, x3, out, saturate, dequant, generator, 2, R, t)
        _check(cpu_library().lb_quant_fos(x3.data_ptr(), out.data_ptr(), R, G, B, brows, ctypes.byref(p), scales.data_ptr()))
        return scales
    p, _keys = _params(q, fmt, x3, out, saturate, dequant, generator, -(-R // chunk_rows), chunk_rows, t)
    _check(cpu_library().lb_quant_groups(x3.data_ptr(), out.data_ptr(), R, G, B, brows, ctypes.byref(p),
                                  scales.data_ptr()))
    return scales


def operand_stats(t: torch.Tensor, tq: torch.Tensor, q: TensorQuant, fmax: float, scales: torch.Tensor, k: int):
    """lowbit.nn.stats.operand_stats' element-wise statistics of rows 0, k, 2k, ... of t and tq (2-D, any
    strides) in one pass, scales in absmax_scale's shape for t (granularity tensor, row or tile); None where
    the kernel does not apply. Returns 0-d fp32 tensors; their sums differ from the eager ones only by
    summation order (double accumulation here)."""
    if torch.compiler.is_compiling() or (t.device.type != "cpu" or t.dim() != 2 or t.dtype not in DTYPE_CODES
                                         or tq.dtype not in DTYPE_CODES or q.granularity == "block" or cpu_library() is None
                                         or not t.numel()):
        return None
    R, C = t.shape
    sc = scales.float().contiguous()
    ss, B = (0, C) if q.granularity == "tensor" else ((1, C) if q.granularity == "row" else (C // q.block, q.block))
    out = (ctypes.c_double * 8)()
    thr = float(torch.tensor(fmax * (1 + 2 ** -20), dtype=torch.float32))  # the eager comparison's fp32 threshold
    cpu_library().lb_operand_stats(t.data_ptr(), DTYPE_CODES[t.dtype], t.stride(0), t.stride(1), tq.data_ptr(),
                            DTYPE_CODES[tq.dtype], tq.stride(0), tq.stride(1), R, C, k, sc.data_ptr(), ss, B, thr,
                            torch.get_num_threads(), out)
    n, nonfin, amax, nz, under, t2, e2, sat = list(out)
    norm = math.sqrt(t2)
    err = math.sqrt(e2) / norm if norm > 0 else math.sqrt(e2)
    def f(v):
        return torch.tensor(v, dtype=torch.float32)
    return {"nonfinite": f(nonfin / n), "amax": f(amax), "underflow": f(under / max(nz, 1.0)),
            "saturated": f(sat / n), "rel_err": f(err), "sqnr_db": f(-20 * math.log10(max(err, 1e-30)))}
