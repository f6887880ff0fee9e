"""Quantizer throughput: fake-quantize GB/s (of fp32 input) for each format × granularity,
next to torch's own float8 round trip, on one N×N fp32 tensor.

    python bench/quant.py                      # 4096×4096, 9 repeats, print a markdown table
    python bench/quant.py --write              # ... and record it in bench/RESULTS.md

Each setting is warmed up twice, then timed `--repeats` times; the table shows the median
(and the minimum, less sensitive to other load on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from _results import machine_meta, timeit, write_section  # bench/ is on sys.path when a script here runs

import torch

from lowbit.formats import cast
from lowbit.quant import fake_quantize
from lowbit.tensor_quant import TensorQuant

SECTION = "## Quantizer throughput (bench/quant.py)"

# (label, recipe that uses it, TensorQuant)
SETTINGS = [
    ("e2m1 tensor", "-", TensorQuant("e2m1", "tensor")),
    ("e2m1 row", "fp4-direct / fp4-paper", TensorQuant("e2m1", "row")),
    ("e2m1 row, stochastic", "-", TensorQuant("e2m1", "row", rounding="stochastic")),
    ("e1m2 row", "FP4 layout ablation", TensorQuant("e1m2", "row")),
    ("e3m0 row", "FP4 layout ablation", TensorQuant("e3m0", "row")),
    ("e2m1 1x32 tile, e8m0 scale", "mxfp4", TensorQuant("e2m1", "tile", 32, "e8m0")),
    ("e2m1 1x16 tile, e4m3 scale", "nvfp4", TensorQuant("e2m1", "tile", 16, "e4m3")),
    ("e2m1 1x16 tile, e4m3 scale, stochastic", "nvfp4 (grad_output)",
     TensorQuant("e2m1", "tile", 16, "e4m3", rounding="stochastic")),
    ("e4m3 tensor", "fp8-tensor", TensorQuant("e4m3", "tensor")),
    ("e5m2 tensor", "fp8-tensor (grad_output)", TensorQuant("e5m2", "tensor")),
    ("e4m3 row", "-", TensorQuant("e4m3", "row")),
    ("e4m3 1x128 tile", "fp8-block (input, grad_output)", TensorQuant("e4m3", "tile", 128)),
    ("e4m3 128x128 block", "fp8-block (weight)", TensorQuant("e4m3", "block", 128)),
]


def run(size: int, repeats: int, device: str) -> tuple[str, dict]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(size, size, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    gbytes = x.numel() * 4 / 1e9
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    load_before = os.getloadavg()

    def add(label, recipe, fn):
        ts = timeit(fn, repeats, sync, warmup=2)
        med, best = statistics.median(ts), min(ts)
        rows.append((label, recipe, med * 1e3, best * 1e3, gbytes / med))

    y = torch.empty_like(x)
    add("y.copy_(x) into a preallocated y (the memory-bandwidth limit: read + write)", "limit", lambda: y.copy_(x))
    add("torch x.to(float8_e4m3fn).float() (no scaling)", "reference",
        lambda: x.to(torch.float8_e4m3fn).to(torch.float32))
    add("lowbit cast(x, 'e4m3') (no scaling)", "-", lambda: cast(x, "e4m3"))
    add("lowbit cast(x, 'e2m1') (no scaling)", "-", lambda: cast(x, "e2m1"))
    for label, recipe, q in SETTINGS:
        add(f"fake_quantize {label}", recipe, lambda q=q: fake_quantize(x, q, generator=g))
    limit, ref = rows[0][4], rows[1][4]
    lines = ["| operation (fp32 in, fp32 out) | recipe | median ms | min ms | GB/s (median) | % of copy | × torch f8 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, recipe, med, best, gbs in rows:
        lines.append(f"| {label} | {recipe} | {med:.1f} | {best:.1f} | {gbs:.2f} | {100 * gbs / limit:.0f}% | "
                     f"{gbs / ref:.2f} |")
    meta = {**machine_meta(dev, load_before[0]), "size": size, "repeats": repeats}
    return "\n".join(lines), meta


def write_results(table: str, meta: dict, command: str, path: Path) -> None:
    body = (f"{SECTION}\n\n"
            f"Command: `{command}`\n\n"
            f"{meta['size']}×{meta['size']} fp32 tensor on {meta['device']} ({meta['cpus']} CPUs, torch "
            f"{meta['torch']}, {meta['threads']} threads); median and min of {meta['repeats']} repeats after 2 "
            f"warm-ups; GB/s counts the fp32 input bytes. Machine load: {meta['load']}.\n"
            f"Scales are computed inside each call (current scaling); the output is a fresh tensor (its allocation "
            f"and page faults count, which the copy limit's preallocated buffer does not). "
            f"On the shared 2-core VM, repeated runs differ by up to about ±20%.\n\n"
            f"{table}\n")
    write_section(SECTION, body, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = p.parse_args()
    table, meta = run(args.size, args.repeats, args.device)
    print(table)
    print(f"\nload: {meta['load']}")
    if args.write:
        cmd = "python bench/quant.py" + (f" --size {args.size}" if args.size != 4096 else "") + \
              (f" --repeats {args.repeats}" if args.repeats != 9 else "") + \
              (f" --device {args.device}" if args.device not in ("cpu", "cuda") else "")
        write_results(table, meta, cmd + " --write", Path(__file__).parent / "RESULTS.md")


if __name__ == "__main__":
    main()
