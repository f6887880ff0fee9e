"""Where a CPU training step's time goes, by compiled function: `perf record` attached to real `lowbit.train`
steps, the samples turned into milliseconds per step.

    python bench/cpu_profile.py --model small --recipes bf16,fp4-paper          # Linux with `perf`
    python bench/cpu_profile.py --model tiny --recipes nvfp4 --steps 30 --top 25

For each recipe one `lowbit.train.train` run (stats off, no evaluation): warm-up steps, then `perf record -p
<this process>` for exactly `--steps` optimizer steps (started and stopped from a step hook, so setup and the
final checkpoint are outside it), then the run ends. Printed per recipe: ms/step per shared object (lowbit's C
kernels, torch, the interpreter, the oneDNN JIT GeMMs as "[JIT]") and the functions taking the most time; with
bf16 among the recipes, every other recipe also gets its functions' difference to bf16 (what the simulation
adds), listed by that difference. The torch profiler cannot see inside lowbit's ctypes calls and cProfile charges them to their Python
callers; perf sees both. Markdown on stdout; no timed assertions. Needs `perf` (linux-perf) and permission to
attach (perf_event_paranoid <= 1, or root).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import corpus_file, cpu_description  # bench/ is on sys.path when a script here runs
from gpu_profile import StepHook

from lowbit.data import prepare_dataset
from lowbit.train import TrainConfig, train

FREQ = 2000  # samples per second


def _record(model: str, recipe: str, skip: int, steps: int, ds, out: Path, data: Path) -> float:
    """Run `recipe`, recording steps skip+1 .. skip+steps into `data`; returns the recorded wall seconds."""
    state = {"n": 0}

    def hook():
        state["n"] += 1
        step = state["n"]
        if step == skip:
            state["p"] = subprocess.Popen(["perf", "record", "-q", "-F", str(FREQ), "-p", str(os.getpid()), "-o",
                                           str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches
            state["t0"] = time.perf_counter()
        elif step == skip + steps:
            state["t"] = time.perf_counter() - state["t0"]
            state["p"].send_signal(signal.SIGINT)
            state["p"].wait()

    B, T = {"tiny": (8, 128), "small": (2, 256)}.get(model, (4, 256))
    cfg = TrainConfig(model=model, recipe=recipe, tokens=(skip + steps + 1) * B * T, batch_size=B, seq_len=T,
                      device="cpu", eval_interval=10**9, log_interval=10**9, ckpt_interval=10**9, keep_last=1,
                      stats_interval=0, seed=0, out=str(out), overwrite=True)
    StepHook.hook = staticmethod(hook)
    train(cfg, progress=False, dataset=ds, trainer=StepHook)
    return state["t"]


def _symbols(data: Path, steps: int) -> tuple[dict, dict]:
    """({dso: ms/step}, {(dso, symbol): ms/step}) from a perf.data of `steps` steps."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-n", "--sort", "dso,sym"],
                         capture_output=True, text=True, check=True).stdout
    dsos, syms = collections.Counter(), collections.Counter()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or line.startswith("#") or not parts[1].isdigit():
            continue
        ms = int(parts[1]) / FREQ * 1e3 / steps
        dso, sym = parts[2], " ".join(parts[4:])[:100]
        dso = "[JIT]" if dso.startswith("[JIT]") else dso
        dsos[dso] += ms
        syms[(dso, sym)] += ms
    return dsos, syms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--recipes", default="bf16,fp4-paper", help="comma-separated recipes")
    p.add_argument("--steps", type=int, default=20, help="recorded steps (default: 20)")
    p.add_argument("--skip", type=int, default=4, help="warm-up steps before recording (default: 4)")
    p.add_argument("--top", type=int, default=15, help="functions per table (default: 15)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        p.error("this needs `perf` (Debian/Ubuntu: apt install linux-perf)")
    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    print(f"## CPU profile: bench/cpu_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(f"{cpu_description()}, {args.threads} torch thread(s), torch {torch.__version__}; {args.steps} steps "
          f"recorded per recipe at {FREQ} Hz after {args.skip} warm-up steps; ms/step = samples / {FREQ} / steps.\n")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        ds = prepare_dataset(str(corpus_file(Path(d))), tokenizer="bpe", vocab_size=2048, progress=False)
        for r in recipes:
            data = Path(d) / f"{r}.data"
            wall = _record(args.model, r, args.skip, args.steps, ds, Path(d) / r, data)
            results[r] = _symbols(data, args.steps)
            dsos, syms = results[r]
            print(f"### {args.model} · {r}: {wall / args.steps * 1e3:.1f} ms/step wall, "
                  f"{sum(dsos.values()):.1f} ms/step sampled\n")
            print("| shared object | ms/step |\n|---|---:|")
            print("\n".join(f"| {k} | {v:.1f} |" for k, v in dsos.most_common(8)))
            print("\n| function | ms/step |" + (" vs bf16 |" if "bf16" in results and r != "bf16" else "") + "\n|---|---:|"
                  + ("---:|" if "bf16" in results and r != "bf16" else ""))
            base = results.get("bf16", (None, {}))[1] if r != "bf16" else {}
            # beside bf16: the functions that add the most time first
            rows = sorted(syms.items(), key=lambda kv: kv[1] - base.get(kv[0], 0.0), reverse=True) if base \
                else syms.most_common()
            for (dso, sym), v in rows[:args.top]:
                extra = f" {v - base.get((dso, sym), 0.0):+.1f} |" if base else ""
                print(f"| {sym} ({os.path.basename(dso)}) | {v:.1f} |{extra}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
