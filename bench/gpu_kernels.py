"""Triton fake-quantize on a CUDA GPU vs the eager quantizer on the same GPU: bit for bit on the benchmark tensor
first, then throughput as a share of a plain device-to-device copy of the same tensor (the memory limit), for
each quantizer of bench/kernels.py the Triton kernels cover, fp32 and bf16 inputs. CUDA-event timing, median
of --repeats after warm-up; all ratios within one run on one GPU.

    python bench/gpu_kernels.py                    # 8192×8192, print the table (bench/gpu.sh runs this)
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
from kernels import SETTINGS  # bench/ is on sys.path when a script here runs

from lowbit import kernels
from lowbit.kernels import triton_quant
from lowbit.quant import fake_quantize


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` CUDA-event-timed calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def run_mode(mode: str, x: torch.Tensor, q) -> torch.Tensor:
    os.environ["LOWBIT_KERNELS"] = mode
    return fake_quantize(x, q)


def measure(size: int, repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(size, size, device="cuda", generator=g).to(dt)
        y = torch.empty_like(x)
        copy = cuda_time(lambda x=x, y=y: y.copy_(x), repeats)
        for label, recipe, q in SETTINGS:
            # "fused": scales and elements in one Triton kernel; "scaled": eager scales, one Triton elementwise pass
            path = "fused" if triton_quant.applies(x, q, None) else \
                "scaled" if triton_quant.scaled_applies(x, q) else None
            if path is None:
                continue
            same = torch.equal(run_mode("eager", x, q).view(torch.int16 if dt == torch.bfloat16 else torch.int32),
                               run_mode("triton", x, q).view(torch.int16 if dt == torch.bfloat16 else torch.int32))
            eager = cuda_time(lambda x=x, q=q: run_mode("eager", x, q), repeats)
            fused = cuda_time(lambda x=x, q=q: run_mode("triton", x, q), repeats)
            rows.append({"quantizer": label, "recipe": recipe, "dtype": str(dt).removeprefix("torch."), "path": path,
                         "bitwise": same, "copy_s": copy, "eager_s": eager, "triton_s": fused})
    os.environ.pop("LOWBIT_KERNELS", None)
    return rows


def table(rows: list[dict], size: int) -> str:
    gb = lambda r, s: 2 * size * size * (4 if r["dtype"] == "float32" else 2) / s / 1e9  # read + write
    lines = [f"Fake-quantize of a {size}×{size} tensor on {torch.cuda.get_device_name()}, torch {torch.__version__}"
             f" (copy: {gb(rows[0], rows[0]['copy_s']):.0f} GB/s fp32)." if rows else "no configuration ran", "",
             ("| quantizer | recipe | dtype | Triton path | bit for bit | eager (% of copy) | Triton (% of copy) | "
              "Triton ÷ eager |"), "|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r['recipe']} | {r['dtype']} | {r['path']} | "
                     f"{'yes' if r['bitwise'] else '**NO**'} | "
                     f"{100 * r['copy_s'] / r['eager_s']:.0f}% | {100 * r['copy_s'] / r['triton_s']:.0f}% | "
                     f"{r['eager_s'] / r['triton_s']:.1f}× faster |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA GPU (bench/gpu.sh runs it there)")
    rows = measure(args.size, args.repeats)
    print(table(rows, args.size))
    print(f"\nFirst-use self-check on the GPU: {kernels._GPU_CHECKED or 'not run'} (None: passed, Triton in use)")


if __name__ == "__main__":
    main()
