"""Host-side cost of the simulation: what a quantizer call and a QLinear step cost when the tensors are too small
for the arithmetic to matter (the regime a GPU's simulated steps are in, see bench/RESULTS.md "On an H200"),
eager quantizers vs lowbit's fused kernels, in one run on one machine.

    python bench/host_overhead.py            # print the tables
    python bench/host_overhead.py --write    # ... and record them in bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from _results import cpu_description, load_avg, write_section  # bench/ is on sys.path when a script here runs

from lowbit.nn import QLinear
from lowbit.quant import fake_quantize
from lowbit.tensor_quant import TensorQuant as T

SECTION = "## Host overhead of the simulation (bench/host_overhead.py)"
QUANTIZERS = [("e4m3 tensor", T("e4m3", "tensor")), ("e2m1 row", T("e2m1", "row")),
              ("e4m3 1x32 tile, e8m0", T("e4m3", "tile", 32, "e8m0")),
              ("nvfp4 1x16 tile", T("e2m1", "tile", 16, "e4m3"))]
RECIPES = ["fp8-tensor", "fp8-block", "fp4-direct", "mxfp8", "nvfp4", "fp4-paper"]


def best_of(fn, calls: int, repeats: int = 5) -> float:
    """Seconds per call: the best of `repeats` timings of `calls` calls, after a warm-up."""
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return min(times)


def step_fn(recipe: str):
    torch.manual_seed(0)
    layer = QLinear(128, 128, recipe=recipe)
    x = torch.randn(128, 128, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
    return step


def measure() -> tuple[list, list]:
    x = torch.randn(16, 64)
    calls = []
    for label, q in QUANTIZERS:
        cell = {}
        for mode in ("eager", "auto"):
            os.environ["LOWBIT_KERNELS"] = mode
            cell[mode] = best_of(lambda q=q: fake_quantize(x, q), 2000)
        calls.append((label, cell))
    steps = []
    os.environ["LOWBIT_KERNELS"] = "auto"
    bf16 = best_of(step_fn("bf16"), 100)
    for r in RECIPES:
        cell = {}
        for mode in ("eager", "auto"):
            os.environ["LOWBIT_KERNELS"] = mode
            cell[mode] = best_of(step_fn(r), 100)
        steps.append((r, cell))
    os.environ.pop("LOWBIT_KERNELS", None)
    return calls, [("bf16", {"eager": bf16, "auto": bf16})] + steps


def table(calls, steps) -> str:
    lines = ["| quantizer (16×64 fp32) | eager µs/call | fused µs/call |", "|---|---:|---:|"]
    lines += [f"| {lbl} | {c['eager'] * 1e6:.0f} | {c['auto'] * 1e6:.0f} |" for lbl, c in calls]
    bf16 = steps[0][1]["auto"]
    lines += ["", ("| recipe (QLinear 128×128, 128 tokens, fwd+bwd) | eager µs/step | fused µs/step | "
                   "fused − bf16 µs | fused ÷ bf16 |"), "|---|---:|---:|---:|---:|"]
    for r, c in steps:
        lines.append(f"| {r} | {c['eager'] * 1e6:.0f} | {c['auto'] * 1e6:.0f} | {(c['auto'] - bf16) * 1e6:.0f} | "
                     f"{c['auto'] / bf16:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help=f"record the tables under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    before = load_avg()
    calls, steps = measure()
    text = "\n".join([SECTION, "", f"Command: `python bench/host_overhead.py{' --write' if args.write else ''}`", "",
                      (f"{cpu_description()}, {args.threads} torch thread(s), torch {torch.__version__}; best of 5 "
                       f"timings; load {before} before, {load_avg()} after. 'fused' is LOWBIT_KERNELS=auto (the "
                       "compiled C kernels here)."), "", table(calls, steps), ""])
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
