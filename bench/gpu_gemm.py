"""What the FP8 GeMM alone gives on this GPU: torch._scaled_mm against a bf16 torch.mm, per operand formats and
output dtype, at one square size (the ceiling for gemm=hardware; bench/qlinear.py times the whole layer).

    python bench/gpu_gemm.py                 # 8192³ on the current CUDA device
    python bench/gpu_gemm.py --size 4096 --repeats 50

Times are CUDA-event medians over `--repeats` calls after warm-up; TFLOP/s = 2·n³ / time. Markdown on stdout.
"""
from __future__ import annotations

import argparse
import sys

import torch
from gpu_kernels import cuda_time  # bench/ is on sys.path when a script here runs

CASES = [("bf16 mm", None, None, torch.bfloat16), ("e4m3 x e4m3 -> bf16", "e4m3", "e4m3", torch.bfloat16),
         ("e4m3 x e4m3 -> fp32", "e4m3", "e4m3", torch.float32), ("e5m2 x e4m3 -> bf16", "e5m2", "e4m3", torch.bfloat16),
         ("e5m2 x e4m3 -> fp32", "e5m2", "e4m3", torch.float32)]
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def case_fn(n: int, fa, fb, out_dtype):
    """A zero-argument callable running one GeMM of n³ (bf16 mm when fa is None; else tensorwise _scaled_mm)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    if fa is None:
        return lambda: torch.mm(a, b.t())
    qa, qb = a.to(_FP8[fa]), b.to(_FP8[fb])  # [n, n] row-major; b goes in column-major, as lowbit passes it
    one = torch.ones((), device="cuda")
    return lambda: torch._scaled_mm(qa, qb.t(), one, one, out_dtype=out_dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_gemm.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    n, rows = args.size, []
    for name, fa, fb, out in CASES:
        try:
            rows.append((name, 1e3 * cuda_time(case_fn(n, fa, fb, out), args.repeats)))
        except RuntimeError as e:  # a GPU without FP8 GeMMs, or a layout torch refuses
            rows.append((name, float("nan")))
            print(f"{name}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
    base = rows[0][1]
    print(f"## GeMM alone, {n}³ on {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| GeMM | ms | TFLOP/s | speed ÷ bf16 |\n|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {2 * n ** 3 / ms / 1e9:.0f} | {base / ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
