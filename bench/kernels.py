"""Fused CPU quantizers vs the eager ones: fake-quantize throughput as a share of a plain copy's, for each
format × granularity × scale rule the recipes use, fp32 and bf16 inputs, 1 and 2 threads; stochastic
rounding's cost over round-to-nearest. All ratios are taken within one run on one machine.

    python bench/kernels.py                  # 4096×4096, print the table
    python bench/kernels.py --write          # ... and record it in bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from _results import machine_meta, timeit, write_section  # bench/ is on sys.path when a script here runs

from lowbit import kernels
from lowbit.formats import empty
from lowbit.quant import fake_quantize
from lowbit.tensor_quant import TensorQuant as T

SECTION = "## Fused CPU quantizers (bench/kernels.py)"

SETTINGS = [  # (label, recipe that uses it, TensorQuant)
    ("e4m3 tensor", "fp8-tensor", T("e4m3", "tensor")),
    ("e5m2 tensor", "fp8-tensor (dY)", T("e5m2", "tensor")),
    ("e4m3 row, pow2 (ceil) scales", "fp8-rowwise", T("e4m3", "row", scale_fmt="e8m0", scale_round="ceil")),
    ("e4m3 1x128 tile", "fp8-block", T("e4m3", "tile", 128)),
    ("e4m3 128x128 block", "fp8-block (W)", T("e4m3", "block", 128)),
    ("e4m3 1x32 tile, e8m0", "mxfp8", T("e4m3", "tile", 32, "e8m0")),
    ("e2m1 row", "fp4-direct / fp4-paper", T("e2m1", "row")),
    ("e1m2 row", "layout ablation", T("e1m2", "row")),
    ("e3m0 row", "layout ablation", T("e3m0", "row")),
    ("e2m1 1x32 tile, e8m0", "mxfp4", T("e2m1", "tile", 32, "e8m0")),
    ("e2m1 1x16 tile, e4m3 x fp32", "nvfp4", T("e2m1", "tile", 16, "e4m3")),
    ("e2m1 16x16 block, e4m3 x fp32", "nvfp4 (W)", T("e2m1", "block", 16, "e4m3")),
]
SR = [  # stochastic-rounding variants, timed beside their round-to-nearest twins
    ("e2m1 row, SR", "e2m1 row", T("e2m1", "row", rounding="stochastic")),
    ("e2m1 1x16 tile, e4m3 x fp32, SR", "e2m1 1x16 tile, e4m3 x fp32",
     T("e2m1", "tile", 16, "e4m3", rounding="stochastic")),
    ("e5m2 tensor, SR", "e5m2 tensor", T("e5m2", "tensor", rounding="stochastic")),
]


def _time(fn, repeats):
    return statistics.median(timeit(fn, repeats, lambda: None, warmup=2))


def measure(size: int, repeats: int, threads: list[int], dtypes: list[torch.dtype]) -> dict:
    """{(dtype, threads): {"copy": s, "copy_alloc": s, (label, mode): s}}; mode "eager" or "cpu" (the public
    call, allocating its output) or "cpu_prealloc" (the fused kernel writing into an already-mapped buffer)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        x = torch.randn(size, size, generator=g).to(dt)
        for th in threads:
            torch.set_num_threads(th)
            out[(dt, th)] = _cell(x, repeats)
    os.environ.pop("LOWBIT_KERNELS", None)
    return out


def _cell(x: torch.Tensor, repeats: int) -> dict:
    y = torch.empty_like(x)
    cell = {"copy": _time(lambda: y.copy_(x), repeats),
            "copy_alloc": _time(lambda: empty(x.shape, x.dtype, x.device).copy_(x), repeats)}
    for label, _, q in SETTINGS + SR:
        def fn(q=q):
            return fake_quantize(x, q, torch.Generator().manual_seed(1))
        for mode in ("eager", "cpu"):
            os.environ["LOWBIT_KERNELS"] = mode
            cell[(label, mode)] = _time(fn, repeats)
        kernels.empty = lambda shape, dtype, device: y if dtype == y.dtype else torch.empty(shape, dtype=dtype)
        cell[(label, "cpu_prealloc")] = _time(fn, repeats)
        kernels.empty = empty
    return cell


def table(res: dict) -> str:
    cols = list(res)
    head = "| quantizer | recipe | " + " | ".join(
        f"{str(dt).removeprefix('torch.')} {th}T" for dt, th in cols) + " |"
    lines = [head, "|---|---|" + "---:|" * len(cols)]
    rows = [(lbl, rcp) for lbl, rcp, _ in SETTINGS] + [(lbl, f"SR ÷ RTN, fused: see {base}") for lbl, base, _ in SR]
    for label, recipe in rows:
        cells = []
        for c in cols:
            r = res[c]
            e, f, k = r[(label, "eager")], r[(label, "cpu")], r[(label, "cpu_prealloc")]
            cells.append(f"{100 * r['copy_alloc'] / e:.0f}% → {100 * r['copy_alloc'] / f:.0f}% "
                         f"({e / f:.1f}×); kernel **{100 * r['copy'] / k:.0f}%**")
        lines.append(f"| {label} | {recipe} | " + " | ".join(cells) + " |")
    sr = []
    for label, base, _ in SR:
        sr.append(f"{label}: " + ", ".join(
            f"{str(dt).removeprefix('torch.')} {th}T {res[(dt, th)][(label, 'cpu')] / res[(dt, th)][(base, 'cpu')]:.2f}"
            for dt, th in cols))
    return "\n".join(lines) + "\n\nStochastic ÷ round-to-nearest time, fused kernels: " + "; ".join(sr) + "."


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = p.parse_args()
    if kernels.which() != "cpu":
        raise SystemExit("the compiled CPU kernels are unavailable here; nothing to compare")
    load0 = os.getloadavg()[0]
    res = measure(args.size, args.repeats, [int(t) for t in args.threads.split(",")],
                  [torch.float32, torch.bfloat16])
    meta = machine_meta(torch.device("cpu"), load0)
    text = table(res)
    print(text)
    if args.write:
        cmd = "python bench/kernels.py" + (f" --size {args.size}" if args.size != 4096 else "") + " --write"
        body = (f"{SECTION}\n\nCommand: `{cmd}`\n\n{args.size}×{args.size} tensors on {meta['device']} "
                f"({meta['cpus']} CPUs, torch {meta['torch']}); median of {args.repeats} calls after 2 warm-ups, "
                f"every cell in one process; scales computed inside each call. Each cell: `fake_quantize`'s speed "
                f"as a share of an allocating copy's (a fresh output buffer, page faults included, then "
                f"`copy_`), eager → fused, and the speed-up; then **the fused kernel writing into an already-"
                f"mapped buffer as a share of `y.copy_(x)` into a preallocated y** (read + write: the memory "
                f"limit). A fresh 64 MiB output costs about as much as the copy itself (the kernel maps and zeroes "
                f"its pages), so the first figures understate what the kernel does; training tensors are smaller "
                f"and their buffers come back from the allocator already mapped. Load: {meta['load']}.\n\n"
                f"{text}\n")
        write_section(SECTION, body, Path(__file__).parent / "RESULTS.md")


if __name__ == "__main__":
    main()
