"""Build and load the compiled CPU kernels (quant.c, cols.c, fos.c, quest.c, stats.c, occ.c, dge.c, rotate.c) as one C
library called through ctypes.

Why this route (measured on a 2-core EPYC): `gcc -O3` of the sources takes about seven seconds (one compiler per
source in parallel, then one link; quant.c's flag-specialised loops are most of it), where
`torch.utils.cpp_extension.load` compiles against the torch headers for tens of seconds, and an
install-time extension would make `pip install -e .` build in an isolated environment that may pull a
CUDA torch. The library only reads and writes memory at `data_ptr()`s, so it needs no torch headers.

The build is cached under `<lowbit cache>/kernels/<key>/`, the key hashing the source, the compiler's
version and this CPU's flags (`-march=native` code must not run on another CPU sharing the cache).
Where no compiler is found (or the build fails) `library()` returns None and lowbit runs its eager
quantizers, saying so once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from lowbit._io import cache_root

SOURCES = [Path(__file__).with_name(n) for n in ("quant.c", "cols.c", "fos.c", "quest.c", "stats.c", "occ.c", "dge.c", "rotate.c")]  # include common.h
HEADERS = [Path(__file__).with_name("common.h")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
_LOCK = threading.Lock()
_LIB: list = []  # [] not tried yet; [None] unavailable; [CDLL] loaded
_WHY: list[str] = []


class Params(ctypes.Structure):
    """Mirror of lb_params in quant.c (field order and types must match)."""
    _fields_ = [(n, ctypes.c_int32) for n in ("mbits", "has_inf", "saturate", "stochastic", "dequant", "emax")] + [
        ("fmax", ctypes.c_float), ("min_normal", ctypes.c_float)] + [
        (n, ctypes.c_int32) for n in ("scale_fmt", "reciprocal", "ceil_round", "has_mult")] + [
        (n, ctypes.c_float) for n in ("scale_mult", "tensor_amax", "block_max")] + [
        ("keys", ctypes.POINTER(ctypes.c_int32)), ("chunk_rows", ctypes.c_int64)] + [
        (n, ctypes.c_int32) for n in ("nthreads", "in_dtype", "out_dtype", "pad", "quest")] + [
        ("quest_c", ctypes.c_float)]


def compiler() -> str | None:
    """The C compiler to use: $CC, else gcc, else cc (None when none is on PATH)."""
    for c in (os.environ.get("CC"), "gcc", "cc"):
        if c and shutil.which(c):
            return c
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def build_key(cc: str) -> str:
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    h = hashlib.sha256()
    for part in [p.read_bytes() for p in SOURCES + HEADERS] + [ver.encode(), _cpu_flags().encode(),
                                                               " ".join(FLAGS).encode()]:
        h.update(part)
    return h.hexdigest()[:16]


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    print("lowbit: compiling the CPU quantization kernels (once per machine, a few seconds)...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        objs = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        # one compiler per source, all at once (quant.c alone takes most of the time), then one link
        compile_flags = [f for f in FLAGS if f != "-shared"]
        procs = [subprocess.Popen([cc, *compile_flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        errs = [p.communicate()[1] for p in procs]
        r = None if any(p.returncode for p in procs) else subprocess.run(
            [cc, *FLAGS, *map(str, objs), "-o", str(out), "-lm"], capture_output=True, text=True, check=False)
        if r is None or r.returncode:
            why = "".join(errs) if r is None else r.stderr
            raise RuntimeError(f"{cc} failed:\n{why.strip()[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the old file or the whole new one


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    P, p64, f32, i32 = ctypes.POINTER(Params), ctypes.c_int64, ctypes.c_float, ctypes.c_int32
    vp = ctypes.c_void_p
    lib.lb_absmax.argtypes = [vp, p64, i32, i32]
    lib.lb_absmax.restype = f32
    lib.lb_absmax_groups.argtypes = [vp, p64, p64, p64, i32, vp, i32]
    lib.lb_transpose.argtypes = [vp, i32, p64, p64, p64, vp, i32]
    lib.lb_quant_tensor.argtypes = [vp, vp, p64, f32, i32, P, vp]
    lib.lb_quant_tensor.restype = None
    lib.lb_operand_stats.argtypes = [vp, i32, p64, p64, vp, i32, p64, p64, p64, p64, p64, vp, p64, p64, f32, i32,
                                     ctypes.POINTER(ctypes.c_double)]
    lib.lb_operand_stats.restype = None
    lib.lb_ell_mm.argtypes = [vp, vp, vp, p64, p64, vp, i32, p64, p64, vp, vp, i32, i32]
    lib.lb_ell_mm.restype = i32
    lib.lb_ell_tmm.argtypes = [vp, vp, vp, p64, p64, vp, i32, p64, p64, vp, i32]
    lib.lb_ell_tmm.restype = i32
    lib.lb_dge_apply.argtypes = [vp, i32, p64, p64, vp, p64, i32, vp, vp, i32, p64, p64, f32, f32, f32, f32, f32,
                                 f32, ctypes.POINTER(ctypes.c_float), f32, vp, i32]
    lib.lb_dge_apply.restype = None
    lib.lb_occ_rows.argtypes = [vp, i32, p64, p64, p64, p64, vp, vp, vp, vp, vp, vp, vp, p64, i32]
    lib.lb_occ_rows.restype = i32
    lib.lb_trust_mask.argtypes = [vp, i32, p64, p64, p64, vp, f32, vp, i32]
    lib.lb_trust_mask.restype = None
    lib.lb_rotate.argtypes = [vp, i32, p64, p64, p64, i32, i32, vp, f32, p64, vp, i32, i32]
    lib.lb_rotate.restype = i32
    for f in (lib.lb_quant_groups, lib.lb_quant_cols, lib.lb_quant_fos):
        f.argtypes = [vp, vp, p64, p64, p64, p64, P, vp]
        f.restype = i32
    return lib


def library():
    """The loaded kernel library, building it on first use; None where it cannot be built (see why())."""
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = None
        cc = compiler()
        if cc is None:
            _WHY.append("no C compiler found (set $CC or install gcc)")
        else:
            target = cache_root() / "kernels" / build_key(cc) / "liblowbit_quant.so"
            try:
                if not target.exists():
                    _build(cc, target)
                lib = _load(target)
            except (OSError, RuntimeError) as e:
                _WHY.append(f"building the CPU kernels failed: {e}")
        if lib is None:
            print(f"lowbit: {_WHY[-1]}; using the eager PyTorch quantizers (same numbers, slower)",
                  file=sys.stderr, flush=True)
        _LIB.append(lib)
        return lib


def why() -> str | None:
    """Why the compiled kernels are unavailable (None when they loaded or were not tried)."""
    return _WHY[-1] if _WHY else None
