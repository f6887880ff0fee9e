"""A/B two versions of the CPU kernel sources in one process: each built into its own library, the same group
quantizer calls (lb_quant_groups, or lb_quant_fos for "4 over 6") on the same [512, 3072] bf16 tensor timed interleaved (1 thread, median of 25), and whether the
two wrote the same bits. For kernel work, where run-to-run noise on a shared 2-core machine (±10%) hides
the 10-20% a change is worth.

    mkdir -p /tmp/A && git show HEAD~1:src/lowbit/kernels/quant.c > /tmp/A/quant.c   # plus the other sources
    python bench/kernel_ab.py /tmp/A src/lowbit/kernels
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lowbit.kernels as K
from lowbit.formats import get_format
from lowbit.kernels import cpu
from lowbit.tensor_quant import TensorQuant as T

QUANTIZERS = {"nvfp4 1x16": T("e2m1", "tile", 16, "e4m3"),
              "nvfp4 1x16 SR": T("e2m1", "tile", 16, "e4m3", rounding="stochastic"),
              "mxfp4 1x32": T("e2m1", "tile", 32, "e8m0"),
              "quartet dY (SR, x4/3)": T("e2m1", "tile", 32, "e8m0", rounding="stochastic", scale_mult=4 / 3),
              "QuEST 1x32": T("e2m1", "tile", 32, "e8m0", scale_rule="quest"),
              "e2m1 row": T("e2m1", "row"), "fp8 1x128": T("e4m3", "tile", 128),
              "fp8 1x128 e8m0 ceil": T("e4m3", "tile", 128, "e8m0", scale_round="ceil"),
              "nvfp4 4over6 1x16": T("e2m1", "tile", 16, "e4m3", four_over_six=True),
              "nvfp4 4over6 1x16 SR": T("e2m1", "tile", 16, "e4m3", rounding="stochastic", four_over_six=True),
              "nvfp4 4over6 16x16": T("e2m1", "block", 16, "e4m3", four_over_six=True)}


def build(src_dir: Path, out: Path):
    """The library from the sources in src_dir (cpu.SOURCES' names, plus common.h), compiled as lowbit does."""
    srcs = [str(src_dir / p.name) for p in cpu.SOURCES]
    subprocess.run(["gcc", *cpu.FLAGS, *srcs, "-o", str(out), "-lm"], check=True)
    return cpu._load(out)  # lowbit's own loader (argument types), on this build


def run(lib, x: torch.Tensor, q: T):
    """(seconds of one lb_quant_groups call, its output, its scales) for x [R, C] bf16 under q (fixed SR keys)."""
    R, C = x.shape
    B = q.block or C
    out, scales = torch.empty_like(x), torch.empty(R // (B if q.granularity == "block" else 1), C // B)
    t = K.absmax(x) if q.scale_fmt == "e4m3" else None
    p, keys = K._params(q, get_format(q.fmt), x, out, True, True, None, 2 if q.four_over_six else 1, R, t)
    for i in range(len(keys)):
        keys[i] = 12345 + i
    fn = lib.lb_quant_fos if q.four_over_six else lib.lb_quant_groups  # "4 over 6": fos.c
    t0 = time.perf_counter()
    brows = B if q.granularity == "block" else 1
    fn(x.data_ptr(), out.data_ptr(), R, C // B, B, brows, ctypes.byref(p), scales.data_ptr())
    return time.perf_counter() - t0, out, scales


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="directory with version A's kernel sources")
    ap.add_argument("b", type=Path, help="directory with version B's kernel sources")
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {n: build(d, Path(tmp) / f"{n}.so") for n, d in (("A", args.a), ("B", args.b))}
        x = torch.randn(512, 3072, generator=torch.Generator().manual_seed(0)).bfloat16()
        print("| quantizer | A ms | B ms | B ÷ A | same bits |\n|---|---:|---:|---:|---|")
        for name, q in QUANTIZERS.items():
            times = {n: [] for n in libs}
            last = {}
            for _ in range(args.reps):
                for n, lib in libs.items():
                    dt, out, sc = run(lib, x, q)
                    times[n].append(dt)
                    last[n] = (out, sc)
            same = all(torch.equal(u.view(torch.int16) if u.dtype == torch.bfloat16 else u, v.view(torch.int16)
                                   if v.dtype == torch.bfloat16 else v) for u, v in zip(last["A"], last["B"]))
            a, b = (statistics.median(times[n]) * 1e3 for n in ("A", "B"))
            print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} | {same} |")


if __name__ == "__main__":
    main()
