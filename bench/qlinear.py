"""QLinear step time: forward + backward of one square linear layer under every registered
recipe, relative to nn.Linear.

    python bench/qlinear.py                    # widths 1024 and 4096, 2048 tokens; markdown table
    python bench/qlinear.py --write            # ... and record it in bench/RESULTS.md

A step is y = layer(x); y.backward(dy) with x: [tokens, width] fp32 (requires grad),
weight [width, width] fp32 with bias. Recipes whose compute_dtype is bf16 run under
torch.autocast(bf16), as the trainer runs them. Each setting is warmed up once, then timed
`--repeats` times (median and min shown). Ratios: against nn.Linear in fp32, and for bf16
recipes also against nn.Linear under bf16 autocast (measured up to --bf16-max-width only:
on CPUs without native bf16 matmul it is very slow).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _results import machine_meta, timeit, write_section  # bench/ is on sys.path when a script here runs

import torch
from torch import nn

from lowbit import recipes
from lowbit.nn import QLinear

SECTION = "## QLinear step time (bench/qlinear.py)"


def step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, bf16: bool):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.backward(dy.to(y.dtype))
    return step


def run(widths, tokens: int, repeats: int, device: str, bf16_max_width: int,
        names: list[str] | None = None) -> tuple[str, dict]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    lines = ["| recipe | width | median ms | min ms | × nn.Linear fp32 | × nn.Linear bf16 autocast |",
             "|---|---:|---:|---:|---:|---:|"]
    for width in widths:
        g = torch.Generator(device=dev).manual_seed(0)
        torch.manual_seed(0)
        lin = nn.Linear(width, width, device=dev)
        x = torch.randn(tokens, width, device=dev, generator=g).requires_grad_(True)
        dy = torch.randn(tokens, width, device=dev, generator=g)

        def med(layer, bf16):
            ts = timeit(step_fn(layer, x, dy, bf16), repeats, sync)
            return statistics.median(ts), min(ts)

        base32 = med(lin, False)
        base16 = med(lin, True) if width <= bf16_max_width else None
        lines.append(f"| nn.Linear fp32 | {width} | {base32[0] * 1e3:.1f} | {base32[1] * 1e3:.1f} | 1.00 | - |")
        if base16:
            lines.append(f"| nn.Linear bf16 autocast | {width} | {base16[0] * 1e3:.1f} | {base16[1] * 1e3:.1f} | "
                         f"{base16[0] / base32[0]:.2f} | 1.00 |")
        for name in names or recipes.names():
            r = recipes.get(name)  # NAME@MODE too, e.g. fp8-tensor@hardware (real FP8 GeMMs)
            bf16 = r.compute_dtype == "bf16"
            m, b = med(QLinear.from_linear(lin, r), bf16)
            vs16 = (f"{m / base16[0]:.3f}" if base16 else "not measured") if bf16 else "-"
            lines.append(f"| {name} | {width} | {m * 1e3:.1f} | {b * 1e3:.1f} | {m / base32[0]:.2f} | {vs16} |")
    from lowbit.cpu_bf16 import cpu_gemm_path

    meta = {**machine_meta(dev, load_before[0]), "tokens": tokens, "repeats": repeats,
            "cpu_gemm": cpu_gemm_path(torch.bfloat16) if dev.type == "cpu" else "-",
            "bf16_max_width": bf16_max_width, "wall": time.perf_counter() - t_start}
    return "\n".join(lines), meta


def write_results(table: str, meta: dict, command: str, path: Path) -> None:
    body = (f"{SECTION}\n\n"
            f"Command: `{command}`\n\n"
            f"Forward + backward of one width×width linear layer with bias on {meta['tokens']} tokens, "
            f"fp32 master weights, on {meta['device']} ({meta['cpus']} CPUs, torch {meta['torch']}, "
            f"{meta['threads']} threads); median and min of {meta['repeats']} repeats after 1 warm-up "
            f"(total {meta['wall']:.0f} s). Machine load: {meta['load']}.\n"
            f"bf16 recipes run under torch.autocast(bf16). CPU bf16 GeMMs: {meta.get('cpu_gemm', '-')} "
            f"(lowbit.cpu_bf16 decides per process: native bf16 GeMMs where the CPU has bf16 matrix units and they "
            f"are faster, else fp32 GeMMs of the bf16 operands); nn.Linear under bf16 autocast is timed up to width "
            f"{meta['bf16_max_width']}. The quantizers are simulated (quantize-dequantize, then a high-precision "
            f"GeMM), so every quantized recipe costs more than nn.Linear here; the table measures the simulation "
            f"overhead, not FP4/FP8 hardware speed.\n\n"
            f"{table}\n")
    write_section(SECTION, body, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16-max-width", type=int, default=None,
                   help="time nn.Linear under bf16 autocast only up to this width (default: every width where bf16 "
                        "GeMMs are native, i.e. on CUDA or a CPU with fast bf16 units; else 1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipes", default="all",
                   help="comma-separated recipes (NAME@MODE selects the GeMM mode, e.g. fp8-tensor@hardware), or all")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = p.parse_args()
    if args.bf16_max_width is None:
        from lowbit.cpu_bf16 import cpu_gemm_path

        native = args.device.startswith("cuda") or cpu_gemm_path(torch.bfloat16) == "native"
        args.bf16_max_width = max(args.widths) if native else 1024
    names = None if args.recipes == "all" else [n.strip() for n in args.recipes.split(",")]
    table, meta = run(args.widths, args.tokens, args.repeats, args.device, args.bf16_max_width, names)
    print(table)
    print(f"\nload: {meta['load']}; wall {meta['wall']:.0f} s")
    if args.write:
        cmd = "python bench/qlinear.py" + \
              (f" --widths {' '.join(map(str, args.widths))}" if args.widths != [1024, 4096] else "") + \
              (f" --tokens {args.tokens}" if args.tokens != 2048 else "") + \
              (f" --repeats {args.repeats}" if args.repeats != 3 else "") + \
              (f" --bf16-max-width {args.bf16_max_width}" if args.bf16_max_width < max(args.widths) else "") + \
              (f" --recipes {args.recipes}" if args.recipes != "all" else "")
        write_results(table, meta, cmd + " --write", Path(__file__).parent / "RESULTS.md")


if __name__ == "__main__":
    main()
