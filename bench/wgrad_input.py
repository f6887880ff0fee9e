"""fp4-paper's weight-gradient GeMM: X requantized along tokens (lowbit's default, realisable on FP4 hardware)
against the forward's per-token Q(X) reused (`wgrad_input = "forward"`, the FP4 paper's code), on one layer.

    python bench/wgrad_input.py [--write]

Reports, for Gaussian activations and for activations with 1% outliers ×30, the relative difference of the two
dW (with DGE, as the recipe runs) and each one's error against the exact dW (DGE off, so the exact product is
the right reference). fp32 compute, so only the quantization differs.
"""
from __future__ import annotations

import argparse

from _results import cpu_description, write_section  # bench/ is on sys.path when a script here runs

import torch

from lowbit import recipes
from lowbit.nn import QLinear

SECTION = "## fp4-paper's dW operand: requantized vs the forward's Q(X) (bench/wgrad_input.py)"


def weight_grad(recipe, lin: torch.nn.Linear, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    q = QLinear.from_linear(lin, recipe)
    q.weight.grad = None
    q(x).backward(dy)
    return q.weight.grad.clone()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(args.width, args.width)
    base = recipes.get("fp4-paper").replace(compute_dtype="fp32")
    rows = ["| activations | dW forward-Q(X) vs requantized (DGE on) | error vs exact, requantized | "
            "error vs exact, forward Q(X) |", "|---|---:|---:|---:|"]
    for name, outliers in (("Gaussian", False), ("1% outliers ×30", True)):
        x = torch.randn(args.tokens, args.width, generator=g)
        if outliers:
            x[torch.rand(x.shape, generator=g) < 0.01] *= 30
        dy = torch.randn(args.tokens, args.width, generator=g)
        exact = dy.t() @ x
        req, fwd = (weight_grad(base.replace(wgrad_input=w), lin, x, dy) for w in ("requantize", "forward"))
        nodge = base.replace(**{"dge.enabled": False})
        err = [float((weight_grad(nodge.replace(wgrad_input=w), lin, x, dy) - exact).norm() / exact.norm())
               for w in ("requantize", "forward")]
        rows.append(f"| {name} | {float((fwd - req).norm() / req.norm()):.1%} | {err[0]:.1%} | {err[1]:.1%} |")
    text = "\n".join([f"`python bench/wgrad_input.py` ([{args.tokens}, {args.width}] activations, fp32 compute; "
                      f"{cpu_description()})", "", *rows])
    print(text)
    if args.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
