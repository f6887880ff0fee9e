"""What the default simulated GeMM adds: bf16-rounded dequantized operands vs gemm="exact" (fp32 operands).

    python bench/gemm_exact.py [--write]

For every recipe that computes in bf16, one 1024 -> 1024 layer on 2048 tokens under bf16 autocast (forward
only, OCC off so the GeMM is alone): the quantization error ||Y_exact - Y|| / ||Y|| (Y: the fp64 product of the
unquantized bf16 operands) and the default's extra error ||Y_rounded - Y_exact|| as a fraction of it.
"""
from __future__ import annotations

import argparse
import sys

from _results import cpu_description, write_section  # bench/ is on sys.path when a script here runs

import torch
from torch import nn

from lowbit import recipes
from lowbit.nn import QLinear
from lowbit.recipes import OCC

SECTION = "## Simulated GeMM precision: gemm = rounded vs exact (bench/gemm_exact.py)"


def forward(lin: nn.Linear, recipe, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return QLinear.from_linear(lin, recipe)(x).double()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)
    x = torch.randn(2048, 1024)
    ref = x.bfloat16().double() @ lin.weight.detach().bfloat16().double().t() + lin.bias.detach().bfloat16().double()
    rows = ["| recipe | quantization error (exact GeMM) | default's extra error / quantization error |",
            "|---|---:|---:|"]
    for name in recipes.names():
        r = recipes.get(name)
        if not r.quantized or r.compute_dtype != "bf16":
            continue
        r = r.replace(occ=OCC())
        exact, rounded = forward(lin, r.replace(gemm="exact"), x), forward(lin, r, x)
        q_err = float((exact - ref).norm() / ref.norm())
        extra = float((rounded - exact).norm() / (exact - ref).norm())
        rows.append(f"| {name} | {q_err:.4f} | {100 * extra:.1f}% |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        cmd = "python bench/gemm_exact.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(SECTION, f"{SECTION}\n\nCommand: `{cmd}`\n\nOne 1024 -> 1024 layer, 2048 tokens, bf16 autocast, "
                      f"forward only, OCC off, on {cpu_description()} (torch {torch.__version__}). Stochastic "
                      f"rounding (nvfp4's gradients) does not enter a forward pass.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
