"""Step time with and without `--compile` (torch.compile, inductor) per model x recipe, as ratios from one run.

    python bench/compile.py                                   # tiny and small under bf16 and fp4-paper
    python bench/compile.py --write                           # ... and record it in bench/RESULTS.md
    python bench/compile.py --models tiny --recipes fp4-paper --window 2 --windows 1   # a smoke run

Each cell is two real `lowbit.train.Trainer`s (the `lowbit train` code path) of one config, same seed, data
and initial weights, one eager and one with `compile=True`, stepped alternately in one process (`cell`): the
compiled one's first `--window` steps hold the compilation (reported as "first window s"), then
`--window * --windows` pairs of steps with the order swapped each pair. This VM's step times drift by tens of
percent between minutes; alternating makes the ratio immune to that. "× eager" is the median of the per-pair
eager / compiled ratios (> 1: compile is faster). If compiling failed and the trainer fell back to eager (it logs
a warning), the cell says so. No quantization statistics (`stats_interval=0`): under --compile a sampled step
runs eagerly (their cost is bench/stats_overhead.py's). Data: the BPE-2048 stdlib-source token stream of
bench/train.py (no network).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import alternate, corpus_file, load_avg, write_section  # bench/ is on sys.path when a script here runs
from torch._dynamo.utils import counters

from lowbit.data import prepare_dataset
from lowbit.models import get_config
from lowbit.train import TrainConfig, Trainer, resolve_device

SECTION = "## torch.compile (bench/compile.py)"
from train import RESULTS, SHAPES  # bench/train.py: the shapes timed there


class _Fallbacks(logging.Handler):
    """Counts the trainer's 'torch.compile failed' warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "torch.compile failed" in record.getMessage():
            self.messages.append(record.getMessage())


def _shape(model: str) -> tuple[int, int]:
    """(batch, seq) as bench/train.py times the model: its SHAPES, else 8 sequences of the full context."""
    return SHAPES.get(model, (8, get_config(model).block_size))


def cell(model, recipe, window, windows, device, workdir: Path, ds, mode: str = "default") -> dict:
    """An eager and a compiled Trainer of the same config (seed, data, initial weights), stepped alternately: the
    compiled one's first `window` steps hold the compilation; then `window * windows` pairs, the order swapped
    each pair, so drift on a shared machine hits both alike. × eager is the median of the per-pair ratios."""
    B, T = _shape(model)
    pairs = window * windows

    def make(compile_: bool) -> Trainer:
        cfg = TrainConfig(model=model, recipe=recipe, tokens=(window + pairs + 1) * B * T, batch_size=B, seq_len=T,
                          device=device, eval_interval=10**9, log_interval=10**9, stats_interval=0,
                          ckpt_interval=10**9, keep_last=1, seed=0, compile=compile_, compile_mode=mode,
                          out=str(workdir / f"{model}-{recipe}-{int(compile_)}"), overwrite=True)
        return Trainer(cfg, progress=False, dataset=ds, device=torch.device(device))

    torch._dynamo.reset()  # a fresh compile cache per cell: cells must not share dynamo's recompile budget
    skips0 = counters["inductor"]["cudagraph_skips"]
    handler = _Fallbacks()
    logging.getLogger("lowbit").addHandler(handler)
    try:
        eager, comp = make(False), make(True)
        t0 = time.perf_counter()
        for _ in range(window):
            comp.train_step()
        first_window_s = time.perf_counter() - t0
        eager.train_step()  # warm-up
        te, tc = alternate(eager.train_step, comp.train_step, pairs)
    finally:
        logging.getLogger("lowbit").removeHandler(handler)
    for tr in (eager, comp):
        tr.logger.close()
    return {"eager_s": statistics.median(te), "step_s": statistics.median(tc), "first_window_s": first_window_s,
            "x_eager": statistics.median(e / c for e, c in zip(te, tc)), "fallback": bool(handler.messages),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips0}


def _note(c: dict) -> str:
    notes = ["compile failed: eager fallback"] if c["fallback"] else []
    if c["cudagraph_skips"]:  # inductor's reasons are in its warnings on stderr
        notes.append(f"CUDA graphs skipped {c['cudagraph_skips']}x")
    return "; ".join(notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,small", help="comma-separated presets (default: tiny,small)")
    p.add_argument("--recipes", default="bf16,fp4-paper", help="comma-separated recipes (default: bf16,fp4-paper)")
    p.add_argument("--window", type=int, default=3, help="optimizer steps per timing window (default: 3)")
    p.add_argument("--windows", type=int, default=3, help="timed windows after the compile/warm-up one (default: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mode", default="default", help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                                                     "max-autotune (default: default)")
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.window < 1 or args.windows < 1:
        p.error("--window and --windows must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    device = resolve_device(args.device)
    cmd = "python bench/compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    before, t0 = load_avg(), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("LOWBIT_CACHE", str(Path(d) / "cache"))
        ds = prepare_dataset(str(corpus_file(Path(d))), tokenizer="bpe", vocab_size=2048, progress=False)
        for model in models:
            for r in names:
                c = cell(model, r, args.window, args.windows, str(device), Path(d), ds, args.mode)
                rows.append((model, r, c))
                print(f"{model:>6} {r:<12} eager {c['eager_s'] * 1e3:8.1f} ms  compiled {c['step_s'] * 1e3:8.1f} ms"
                      f"  x{c['x_eager']:.2f}{'  (fell back to eager)' if c['fallback'] else ''}"
                      f"  load {load_avg()}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    lines = ["| model | recipe | batch x seq | eager ms/step | compiled ms/step | × eager | compiled first window s | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for model, r, c in rows:
        B, T = _shape(model)
        lines.append(f"| {model} | {r} | {B}x{T} | {c['eager_s'] * 1e3:.1f} | {c['step_s'] * 1e3:.1f} | "
                     f"{c['x_eager']:.2f} | {c['first_window_s']:.1f} | {_note(c)} |")
    text = "\n".join([
        SECTION, "",
        f"Command: `{cmd.strip()}`", "",
        (f"{where}, torch {torch.__version__}, inductor backend, mode {args.mode}; every cell an eager and a "
         "compiled `lowbit.train.Trainer` of the same config (seed 0), stepped alternately after the compiled one's "
         f"first {args.window} steps (which hold the compilation): {args.window * args.windows} pairs, the order "
         "swapped each pair; ms/step are medians, × eager the median of the per-pair eager ÷ compiled ratios "
         f"(> 1: compiled is faster); no statistics sampled. {wall:.0f} s in all. Load average (1 min): {before} "
         f"before, {load_avg()} after."),
        "", "\n".join(lines), "",
    ])
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
