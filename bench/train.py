"""Training throughput of lowbit's trainer: tokens/s and MFU per model x recipe, in one process, with
ratios to the bf16 and fp32 references.

    python bench/train.py                                  # tiny and small, every recipe, print the table
    python bench/train.py --write                          # ... and record it in bench/RESULTS.md
    python bench/train.py --models tiny --recipes bf16,fp4-paper --steps 10 --device cuda

Each cell is one real `lowbit.train.train` run (the same code path as `lowbit train`) of
`--window * (--windows + 1)` optimizer steps with log_interval = `--window`: the first window is warm-up and
dropped, the cell is the median over the other windows' tokens/s (robust to a colleague's job starting on a
shared machine). No evaluation; no per-layer quantization statistics unless `--stats-interval N` (with windows
of 3 steps, sampling at the log interval would sample every third step, over three times a normal run's rate
of one in 10; their cost at that default is bench/stats_overhead.py --in-run's); the final checkpoint is
written after timing. Data: a BPE-2048 token stream built from this Python's standard
library sources (no network; throughput does not depend on the text). MFU is model FLOPs (lowbit.flops,
6N + attention per token) over lowbit.flops.peak_flops(device): on CPU the measured fp32 matmul peak, on GPU
the dense BF16 tensor-core peak. On hardware without FP4/FP8 GeMMs every quantized recipe is simulated
(quantize-dequantize + a bf16/fp32 GeMM, as in the FP4 paper), so it is slower than bf16, not faster.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import alternate, corpus_file, cpu_description, load_avg, write_section  # bench/ is on sys.path when a script here runs

import torch

from lowbit import flops, kernels, recipes
from lowbit.cpu_bf16 import cpu_gemm_path
from lowbit.data import prepare_dataset
from lowbit.models import get_config
from lowbit.train import TrainConfig, Trainer, resolve_device, train

SECTION = "## Training throughput (bench/train.py)"
RESULTS = Path(__file__).with_name("RESULTS.md")
# micro-batch per model: ~1k tokens per step on CPU (full context)
SHAPES = {"tiny": (8, 128), "small": (2, 256), "llama-tiny": (8, 128), "llama-small": (2, 256)}


def peak(device: torch.device) -> float:
    """Peak FLOP/s for MFU. CPU: a fresh (uncached) matmul measurement -- the caller keeps the best of several,
    since a measurement taken while a colleague's job runs underestimates the peak (MFU > 100%)."""
    if device.type == "cpu":
        return flops.measure_cpu_matmul_flops.__wrapped__(1024, 10)
    return flops.peak_flops(device)


def run(models, recipe_names, window, windows, device, shapes, workdir: Path, ds, stats_interval=0):
    rows = []
    for model in models:
        B, T = shapes.get(model, (8, get_config(model).block_size))
        for r in recipe_names:
            steps = window * (windows + 1)
            cfg = TrainConfig(model=model, recipe=r, tokens=steps * B * T, batch_size=B, seq_len=T, device=device,
                              eval_interval=10**9, eval_batches=1, log_interval=window, ckpt_interval=10**9,
                              keep_last=1, stats_interval=stats_interval,
                              out=str(workdir / f"{model}-{r}"), overwrite=True, seed=0)
            res = train(cfg, progress=False, dataset=ds)
            timed = res.history[1:]  # drop the warm-up window
            tps = statistics.median(h["tokens_per_s"] for h in timed)
            fpt = flops.flops_per_token(get_config(model, vocab_size=ds.tokenizer.vocab_size), T)["train"]
            rows.append({"model": model, "recipe": r, "batch": B, "seq": T, "tokens_per_s": tps,
                         "step_ms": B * T / tps * 1e3, "flops_per_token": fpt,
                         "peak_mib": res.peak_mem_bytes / 2 ** 20 if res.peak_mem_bytes else None})
            print(f"{model:>6} {r:<20} {tps:>10,.0f} tok/s  {B * T / tps * 1e3:>9.1f} ms/step  load {load_avg()}",
                  file=sys.stderr, flush=True)
    return rows


def _trainer(model, recipe, B, T, steps, device, workdir: Path, ds) -> Trainer:
    """A Trainer for `steps` steps of B x T tokens, no evaluation, logging, statistics or checkpoints on the way."""
    cfg = TrainConfig(model=model, recipe=recipe, tokens=steps * B * T, batch_size=B, seq_len=T, device=device,
                      eval_interval=10**9, eval_batches=1, log_interval=10**9, ckpt_interval=10**9, keep_last=1,
                      stats_interval=0, out=str(workdir / f"{model}-{recipe}-paired"), overwrite=True, seed=0)
    return Trainer(cfg, progress=False, dataset=ds, device=torch.device(device))


def paired(models, recipe_names, window, windows, device, workdir: Path, ds):
    """Each recipe's Trainer stepped alternately with a bf16 Trainer of the same model, data and seed (the order
    swapped each pair), `window * windows` pairs after one warm-up step each: 'step × bf16' is the median of the
    per-pair ratios, so a machine whose speed drifts by tens of percent over minutes (a shared VM) slows both
    sides of a pair alike. Rows as run() gives them, plus "x_bf16"."""
    rows, pairs = [], window * windows
    for model in models:
        B, T = SHAPES.get(model, (8, get_config(model).block_size))
        ref = _trainer(model, "bf16", B, T, pairs + 2, device, workdir, ds)
        ref.train_step()  # warm-up
        fpt = flops.flops_per_token(get_config(model, vocab_size=ds.tokenizer.vocab_size), T)["train"]
        for r in recipe_names:
            tr = _trainer(model, r, B, T, pairs + 2, device, workdir, ds) if r != "bf16" else ref
            tr.train_step()
            base, mine = alternate(ref.train_step, tr.train_step, pairs)
            if tr is not ref:
                tr.logger.close()
            step = statistics.median(mine)
            x = statistics.median(a / b for a, b in zip(mine, base)) if tr is not ref else 1.0
            rows.append({"model": model, "recipe": r, "batch": B, "seq": T, "tokens_per_s": B * T / step,
                         "step_ms": step * 1e3, "flops_per_token": fpt, "peak_mib": None, "x_bf16": x})
            print(f"{model:>6} {r:<20} {step * 1e3:>9.1f} ms/step  x bf16 {x:.2f}  load {load_avg()}",
                  file=sys.stderr, flush=True)
        ref.logger.close()
    return rows


def run_modes(modes, models, names, window, windows, device, workdir: Path, ds, stats_interval=0):
    """run() under each LOWBIT_KERNELS mode; the quantized recipes of every mode but the last are labelled
    "<recipe> [<mode> quantizers]" (fp32/bf16 quantize nothing and run once)."""
    rows = []
    for i, mode in enumerate(modes):
        os.environ["LOWBIT_KERNELS"] = mode.strip()
        last = i == len(modes) - 1
        todo = names if last else [n for n in names if n not in ("fp32", "bf16")]
        for r in run(models, todo, window, windows, device, SHAPES, workdir, ds, stats_interval):
            rows.append(r if last else {**r, "recipe": f"{r['recipe']} [{mode.strip()} quantizers]"})
    os.environ.pop("LOWBIT_KERNELS", None)
    return rows


def table(rows, peak_flops: float) -> str:
    ref = {(r["model"], r["recipe"]): r["tokens_per_s"] for r in rows}
    mem = {(r["model"], r["recipe"]): r.get("peak_mib") for r in rows}
    out = ["| model | recipe | batch x seq | tokens/s | ms/step | MFU | step × bf16 | step × fp32 | peak MiB | "
           "peak × bf16 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def ratio(base):  # step time over the base's (tokens/s the other way round); paired: the pairs' median
            if "x_bf16" in r:  # paired: only the bf16 ratio is a paired one
                return f"{r['x_bf16']:.2f}" if base == "bf16" else "-"
            b = ref.get((r["model"], base))
            return f"{b / r['tokens_per_s']:.2f}" if b else "-"
        mfu = f"{flops.mfu(r['tokens_per_s'], r['flops_per_token'], peak_flops):.2%}"
        m, mb = r.get("peak_mib"), mem.get((r["model"], "bf16"))
        out.append(f"| {r['model']} | {r['recipe']} | {r['batch']}x{r['seq']} | {r['tokens_per_s']:,.0f} | "
                   f"{r['step_ms']:.1f} | {mfu} | {ratio('bf16')} | {ratio('fp32')} | "
                   f"{f'{m:,.0f}' if m else '-'} | {f'{m / mb:.2f}' if m and mb else '-'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,small", help="comma-separated model presets (default: tiny,small)")
    p.add_argument("--recipes", default="all", help="comma-separated recipes, or 'all' (default)")
    p.add_argument("--window", type=int, default=3, help="optimizer steps per timing window (default: 3)")
    p.add_argument("--windows", type=int, default=2, help="timed windows after the warm-up one (default: 2)")
    p.add_argument("--passes", type=int, default=2,
                   help="run every cell this many times, keep the fastest (a shared machine only slows runs down)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kernels", default="auto",
                   help="LOWBIT_KERNELS modes to run the quantized recipes under, e.g. 'eager,auto' for the eager "
                        "quantizers beside the fused ones in one run (default: auto)")
    p.add_argument("--stats-interval", type=int, default=0,
                   help="sample per-layer quantization statistics every N steps (default: 0, none; the trainer's "
                        "default is its log interval, 10)")
    p.add_argument("--paired", action="store_true",
                   help="step each recipe alternately with a bf16 trainer and report the median per-pair ratio "
                        "(for machines whose speed drifts; no fp32 column, no peak memory)")
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in {RESULTS.name}")
    args = p.parse_args(argv)
    if args.window < 1 or args.windows < 1:
        p.error("--window and --windows must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = recipes.names() if args.recipes == "all" else [r.strip() for r in args.recipes.split(",")]
    device = resolve_device(args.device)
    cmd = "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    before = load_avg()
    t0 = time.perf_counter()
    peaks = [peak(device)]
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("LOWBIT_CACHE", str(Path(d) / "cache"))
        ds = prepare_dataset(str(corpus_file(Path(d))), tokenizer="bpe", vocab_size=2048, progress=False)
        if args.paired:
            os.environ["LOWBIT_KERNELS"] = args.kernels.split(",")[-1].strip()
            passes = [paired(models, names, args.window, args.windows, str(device), Path(d), ds)]
        else:
            passes = [run_modes(args.kernels.split(","), models, names, args.window, args.windows, str(device),
                                Path(d), ds, args.stats_interval) for _ in range(args.passes)]
    peaks.append(peak(device))
    os.environ["LOWBIT_KERNELS"] = args.kernels.split(",")[-1].strip()
    used = kernels.which(device.type)
    os.environ.pop("LOWBIT_KERNELS", None)
    rows = [max(cells, key=lambda c: c["tokens_per_s"]) for cells in zip(*passes)]
    best_peak = max(peaks)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_description()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    text = "\n".join([
        SECTION, "",
        f"Command: `{cmd.strip()}`", "",
        f"{where}, torch {torch.__version__}; one process, every cell a real `lowbit.train` "
        + (f"Trainer over {args.window * args.windows} pairs of steps on BPE-2048 tokens, seed 0, each recipe's "
           "`Trainer` stepped alternately with a bf16 one (order swapped each pair, one warm-up step each): ms/step is the recipe's "
           "median step, step × bf16 the median of the per-pair ratios; " if args.paired else
           f"`train` run of {args.window * (args.windows + 1)} steps on BPE-2048 tokens, seed 0: median tokens/s over "
           f"{args.windows} windows of {args.window} steps after a warm-up window; best of {args.passes} passes over "
           "all cells; ") +
        (f"quantization statistics every {args.stats_interval} steps; " if args.stats_interval else
           "no quantization statistics (their cost: bench/stats_overhead.py --in-run); ") +
        f"{wall:.0f} s in all. "
        f"Load average (1 min): {before} before, {load_avg()} after.",
        "MFU = model training FLOPs (6N + attention, lowbit.flops) / peak; "
        + ("peak = dense BF16 tensor-core peak of the GPU." if device.type == "cuda" else
           f"peak = this CPU's measured fp32 1024^3 matmul throughput, best of before/after the runs "
           f"({best_peak / 1e9:.0f} GFLOP/s; measured {', '.join(f'{p / 1e9:.0f}' for p in peaks)}), so bf16 cells are "
           f"measured against an fp32 peak. CPU bf16 GeMMs: {cpu_gemm_path(torch.bfloat16)} (lowbit.cpu_bf16: "
           "native where the CPU has fast bf16 units, else fp32 GeMMs of the bf16 operands; attention always on "
           "the fp32 upcast). Every quantized recipe adds simulated (quantize-dequantize) FP8/FP4 casts around "
           "its GeMMs, so 'step × bf16' is the cost of the quantization simulation itself. No FP4/FP8 hardware "
           "speed-up is possible here. Peak memory: the run's resident-set high-water mark (CPU; reset per run "
           "where Linux allows) or CUDA's peak allocation."),
        f"Quantizers (LOWBIT_KERNELS): {', '.join(args.kernels.split(','))}; rows without a label used the last "
        f"mode ({used} here: 'cpu' is lowbit's fused CPU kernels, 'triton' its GPU ones, 'eager' its PyTorch ops; "
        "the numbers "
        "are bit for bit the same).",
        "", table(rows, best_peak), "",
    ])
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
