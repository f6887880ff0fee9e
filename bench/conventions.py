"""How much the scale conventions and NVIDIA's weight blocks change, on bf16 Gaussian data.

    python bench/conventions.py [--write]

- divide vs reciprocal (TE/torchao): codes that flip between the two conventions (FP8 per-tensor, NVFP4);
- power-of-two scales, floor (OCP) vs ceil (RCEIL): fraction of elements saturated, relative error;
- saturation per recipe: the share of entries that land beyond the format's max after scaling (clipped);
- NVFP4 weights: elements of W whose quantized value differs between the forward GeMM and the dX GeMM, with
  1×16 tiles (requantized along the other dim: `nvfp4-tiles`) and with 16×16 blocks (`nvfp4`).
"""
from __future__ import annotations

import argparse
import sys

from _results import cpu_description, write_section  # bench/ is on sys.path when a script here runs

import torch

from lowbit import recipes
from lowbit.quant import absmax_scale, divide_by_scales, fake_quantize, fake_quantize_with_scales, quantize
from lowbit.tensor_quant import TensorQuant

SECTION = "## Scale conventions and NVFP4 weight blocks (bench/conventions.py)"


def codes(x, q):
    return quantize(x, q).codes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the tables under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=g).bfloat16().float()
    rows = ["| quantizer | codes that flip, divide vs reciprocal | of |", "|---|---:|---:|"]
    # eight [256, 256] tensors, each with its own absmax (per-tensor scales: one draw would be one scale)
    xs = [torch.randn(256, 256, generator=torch.Generator().manual_seed(s)).bfloat16().float() for s in range(8)]
    for name, q in (("E4M3 per tensor", TensorQuant("e4m3", "tensor")), ("E5M2 per tensor", TensorQuant("e5m2", "tensor")),
                    ("NVFP4 1×16", TensorQuant("e2m1", "tile", 16, "e4m3"))):
        rq = TensorQuant(**{**q.__dict__, "reciprocal": True})
        flips = sum(int((codes(t, q) != codes(t, rq)).sum()) for t in xs)
        rows.append(f"| {name} | {flips:,} | {sum(t.numel() for t in xs):,} |")
    rows += ["", "| power-of-two scales (1×32 tiles) | saturated elements | relative error |", "|---|---:|---:|"]
    for fmt in ("e4m3", "e2m1"):
        for mode in ("floor", "ceil"):
            q = TensorQuant(fmt, "tile", 32, "e8m0", scale_round=mode)
            s = absmax_scale(x, q).view(512, 32, 1)
            sat = float((x.view(512, 32, 32).abs() / s > q_max(fmt)).float().mean())
            err = float((fake_quantize(x, q) - x).norm() / x.norm())
            rows.append(f"| {fmt} {mode} | {sat:.2%} | {err:.4f} |")
    w = torch.randn(1024, 1024, generator=g).bfloat16().float()
    rows += ["", "| NVFP4 weight | elements of W that differ between the forward and the dX GeMM |", "|---|---:|"]
    tiles = TensorQuant("e2m1", "tile", 16, "e4m3")
    fwd, dgrad = fake_quantize(w, tiles), fake_quantize(w.t().contiguous(), tiles).t()
    rows.append(f"| 1×16 tiles (nvfp4-tiles) | {float((fwd != dgrad).float().mean()):.1%} |")
    blocks = TensorQuant("e2m1", "block", 16, "e4m3")
    fwd, dgrad = fake_quantize(w, blocks), fake_quantize(w.t().contiguous(), blocks).t()
    rows.append(f"| 16×16 blocks (nvfp4) | {float((fwd != dgrad).float().mean()):.1%} |")
    rows += ["", "| recipe (input quantizer) | entries saturated (beyond the format max after scaling) |", "|---|---:|"]
    for name in ("fp8-tensor", "fp4-direct", "mxfp8", "mxfp8-rceil", "mxfp4", "nvfp4", "nvfp4-4over6", "quartet"):
        q = recipes.get(name).input
        _, scales = fake_quantize_with_scales(x, q)
        sat = float((divide_by_scales(x, q, scales).abs() > q_max(q.fmt) * (1 + 2 ** -20)).float().mean())
        rows.append(f"| {name} | {sat:.2%} |")
    body = (f"{SECTION}\n\nCommand: `python bench/conventions.py --write`\n\nbf16-rounded Gaussian data, x [512, 1024], "
            f"W [1024, 1024], on {cpu_description()} (torch {torch.__version__}).\n\n" + "\n".join(rows))
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


def q_max(fmt):
    return {"e4m3": 448.0, "e2m1": 6.0}[fmt]


if __name__ == "__main__":
    sys.exit(main())
