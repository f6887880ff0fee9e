"""fp4-paper as its authors ran it vs lowbit's earlier all-FP4 reading, measured on one layer.

    python bench/fp4_paper_reference.py [--write]

For a 4096-token x 1024 -> 1024 linear layer (fp32 compute, seeds fixed) on Gaussian activations and on
activations with 0.5% outliers of 30x, prints the relative error ||Q-product - exact|| / ||exact|| of Y, dX and
dW for `fp4-paper` (per-token OCC, E5M2 per-tensor output gradient) and `fp4-paper-allfp4` (tensor-wide OCC,
E2M1 output gradient), DGE off, and how far the two readings' forward outputs are apart. With --write the table goes
into bench/RESULTS.md (section below), with the command and the machine.
"""
from __future__ import annotations

import argparse
import sys
import time

from _results import cpu_description, load_avg, write_section  # bench/ is on sys.path when a script here runs

import torch
from torch import nn

from lowbit import recipes
from lowbit.nn import QLinear

SECTION = "## fp4-paper as its authors ran it (bench/fp4_paper_reference.py)"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


READINGS = {  # label -> recipe
    "fp4-paper": recipes.get("fp4-paper"),
    "fp4-paper, weight_scale_axis=in": recipes.get("fp4-paper").replace(weight_scale_axis="in"),
    "fp4-paper-allfp4": recipes.get("fp4-paper-allfp4"),
}


def errors(recipe, x: torch.Tensor, dy: torch.Tensor, lin: nn.Linear) -> dict:
    # DGE off: it multiplies dW by f'(W) on purpose (not an approximation of the exact product); Y and dX do not
    # depend on it
    q = QLinear.from_linear(lin, recipe.replace(compute_dtype="fp32", **{"dge.enabled": False}))
    for prm in q.parameters():  # q shares lin's Parameters: no gradient left from the previous recipe
        prm.grad = None
    xi = x.clone().requires_grad_(True)
    y = q(xi)
    y.backward(dy)
    w = lin.weight.detach()
    return {"y": y.detach(), "Y": rel(y.detach(), x @ w.t() + lin.bias.detach()), "dX": rel(xi.grad, dy @ w),
            "dW": rel(q.weight.grad, dy.t() @ x)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)
    before, t0 = load_avg(), time.perf_counter()
    rows = ["| activations | recipe | rel. error Y | rel. error dX | rel. error dW |", "|---|---|---:|---:|---:|"]
    gaps = []
    for data in ("Gaussian", "0.5% outliers x30"):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4096, 1024, generator=g)
        if data != "Gaussian":
            x[torch.rand(x.shape, generator=g) < 0.005] *= 30
        dy = torch.randn(4096, 1024, generator=g) * 1e-3
        res = {label: errors(r, x, dy, lin) for label, r in READINGS.items()}
        for r, e in res.items():
            rows.append(f"| {data} | {r} | {e['Y']:.4f} | {e['dX']:.4f} | {e['dW']:.4f} |")
        ref = res["fp4-paper"]["y"]
        gaps.append(f"{data}: all-FP4 {100 * rel(res['fp4-paper-allfp4']['y'], ref):.1f}%, weight axis in "
                    f"{100 * rel(res['fp4-paper, weight_scale_axis=in']['y'], ref):.1f}%")
    table = "\n".join(rows)
    print(table)
    print("forward outputs apart from fp4-paper's (relative norm): " + "; ".join(gaps))
    if args.write:
        cmd = "python bench/fp4_paper_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(SECTION, f"{SECTION}\n\nCommand: `{cmd}`\n\nOne 1024 -> 1024 linear layer, 4096 tokens, fp32 "
                      f"compute, on {cpu_description()} (torch {torch.__version__}, {torch.get_num_threads()} threads; "
                      f"load {before} before, {load_avg()} after; {time.perf_counter() - t0:.0f} s). Relative error "
                      f"against the exact fp32 products, DGE off (it scales dW by f'(W) on purpose; Y and dX do "
                      f"not depend on it).\n\n{table}\n\nForward outputs apart from fp4-paper's (relative norm): "
                      f"{'; '.join(gaps)}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
