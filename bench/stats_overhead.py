"""What per-layer quantization statistics cost: step time with --stats-interval 0 (off), at the default (the
log interval, 10) and at every step, for `small` under fp4-paper and nvfp4, as ratios to "off", in one process.

    python bench/stats_overhead.py [--steps 30] [--write]

Each cell is a real `lowbit.train.train` run of --steps steps (log_interval 10, no evaluation) on the embedded
corpus; the cell is the median step time over the steps after the first (warm-up), from metrics.jsonl's
tokens/s of each logged window. Cells run interleaved in two passes and the faster pass counts (robust to
another process starting on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _results import cpu_description, load_avg, write_section  # bench/ is on sys.path when a script here runs

import torch

from lowbit.train import TrainConfig, train

SECTION = "## Cost of per-layer statistics (bench/stats_overhead.py)"
SECTION_IN_RUN = "## Cost of per-layer statistics inside one run (bench/stats_overhead.py --in-run)"
INTERVALS = {"off": 0, "default (10)": None, "every step": 1}


def step_time(recipe: str, interval, steps: int, root: Path) -> float:
    out = root / f"{recipe}-{interval}"
    cfg = TrainConfig(model="small", recipe=recipe, tokens=steps * 4 * 256, batch_size=4, seq_len=256,
                      log_interval=10 if interval != 1 else 1, stats_interval=interval, eval_interval=10 ** 6,
                      ckpt_interval=10 ** 6, out=str(out), overwrite=True, device="cpu")
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]  # the first window holds warm-up
    return 4 * 256 / statistics.median(tps)


def in_run(recipe: str, steps: int, root: Path, interval: int = 10) -> dict:
    """One run, a metrics row every step, statistics every `interval` steps: median ms of the sampled and the
    unsampled steps (the first step, warm-up, left out), and what sampling costs at that interval."""
    out = root / f"{recipe}-inrun"
    cfg = TrainConfig(model="small", recipe=recipe, tokens=steps * 4 * 256, batch_size=4, seq_len=256,
                      log_interval=1, stats_interval=interval, eval_interval=10 ** 6, ckpt_interval=10 ** 6,
                      out=str(out), overwrite=True, device="cpu")
    train(cfg, progress=False)
    sampled = {json.loads(line)["step"] for line in (out / "quant_stats.jsonl").read_text().splitlines()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    ms = {s: [4 * 256 / r["tokens_per_s"] * 1e3 for r in rows if (r["step"] in sampled) == s] for s in (True, False)}
    on, off = statistics.median(ms[True]), statistics.median(ms[False])
    return {"sampled_ms": on, "unsampled_ms": off, "n_sampled": len(ms[True]), "n_unsampled": len(ms[False]),
            "overhead": (on - off) / (interval * off)}


def main_in_run(a) -> int:
    load0 = load_avg()
    lines = ["| recipe | statistics kernels | unsampled ms/step | sampled ms/step | sampled ÷ unsampled | "
             "overhead at interval 10 |", "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes.split(","):
            for mode in ("eager", "auto"):
                os.environ["LOWBIT_KERNELS"] = mode
                r = in_run(recipe, a.steps, Path(tmp))
                lines.append(f"| {recipe} | {'fused' if mode == 'auto' else 'eager'} | {r['unsampled_ms']:.1f} "
                             f"(n={r['n_unsampled']}) | {r['sampled_ms']:.1f} (n={r['n_sampled']}) | "
                             f"{r['sampled_ms'] / r['unsampled_ms']:.2f} | {100 * r['overhead']:.1f}% |")
    os.environ.pop("LOWBIT_KERNELS", None)
    body = (f"{SECTION_IN_RUN}\n\nCommand: `python bench/stats_overhead.py --in-run --steps {a.steps} --write`\n\n"
            f"`small` (batch 4×256), one run of {a.steps} steps per cell with a metrics row every step and "
            f"statistics every 10th step, on {cpu_description()} ({torch.get_num_threads()} threads, torch "
            f"{torch.__version__}); load {load0} before, {load_avg()} after. Sampled and unsampled steps come "
            "from the same run (medians, the first step left out), so the machine's drift between runs cancels; "
            "'overhead' = (sampled − unsampled) / (10 × unsampled), the cost at the default interval. 'eager' "
            "runs everything eager (LOWBIT_KERNELS=eager), 'fused' the compiled quantizers and statistics.\n\n"
            + "\n".join(lines))
    print(body)
    if a.write:
        write_section(SECTION_IN_RUN, body)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--recipes", default="fp4-paper,nvfp4")
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    p.add_argument("--in-run", action="store_true",
                   help="time sampled vs unsampled steps inside one run per recipe (eager and fused statistics)")
    a = p.parse_args(argv)
    if a.in_run:
        return main_in_run(a)
    load0 = load_avg()
    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            for recipe in a.recipes.split(","):
                for name, interval in INTERVALS.items():
                    t = step_time(recipe, interval, a.steps, Path(tmp))
                    best[(recipe, name)] = min(t, best.get((recipe, name), float("inf")))
    rows = ["| recipe | statistics | ms/step | × off |", "|---|---|---:|---:|"]
    for recipe in a.recipes.split(","):
        off = best[(recipe, "off")]
        for name in INTERVALS:
            rows.append(f"| {recipe} | {name} | {best[(recipe, name)] * 1e3:.1f} | {best[(recipe, name)] / off:.3f} |")
    body = (f"{SECTION}\n\nCommand: `python bench/stats_overhead.py --steps {a.steps} --write`\n\n`small` (batch "
            f"4×256), {a.steps} steps per cell, on {cpu_description()} ({torch.get_num_threads()} threads, torch "
            f"{torch.__version__}); load {load0} before, {load_avg()} after. Metrics windows are 10 steps (1 for "
            "'every step'), so 'default' measures a window with one sampled step.\n\n" + "\n".join(rows))
    print(body)
    if a.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
