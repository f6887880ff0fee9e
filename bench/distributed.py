"""Distributed throughput and crash safety of `lowbit train`: tokens/s for 1 vs 2 processes on this machine (same
model, same global batch), and K kill-and-resume trials counting the runs that lost data.

    python bench/distributed.py                         # tiny, 30 steps per throughput run, 5 kill trials
    python bench/distributed.py --trials 20 --write     # ... and record it in bench/RESULTS.md
    python bench/distributed.py --trials 1 --steps 8    # smoke run

Every run is a real `python -m lowbit train` subprocess (the CLI path, torchrun for 2 processes via --nproc),
CPU, fp32 recipe, BPE-2048 tokens of this Python's standard-library sources (no network).

Throughput rows: 1 process x 1 thread; 1 process x 2 threads (both cores, one process); 2 processes x 1 thread
under DDP and under FSDP2. tokens/s is the run's own figure (result.json: global tokens per step over the mean
step time after the first step; evaluation and checkpoints excluded), best of --passes runs.

Kill trials: an uninterrupted reference run, then per trial a run that is SIGKILLed (the whole process group) at
a seeded random moment -- after a random number of logged steps plus a random delay of up to one step, with a
checkpoint every --ckpt-interval steps so some kills land inside a checkpoint write -- then resumed with --resume.
A trial lost data if the resume failed or its final weights differ in any bit from the reference run's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import corpus_file, load_avg, write_section  # bench/ is on sys.path when a script here runs

SECTION = "## Distributed and crash safety (bench/distributed.py)"
RESULTS = Path(__file__).with_name("RESULTS.md")


def train_args(corpus: Path, out: Path, steps: int, batch: int, seq: int, **extra) -> list[str]:
    args = ["train", "--model", "tiny", "--recipe", "fp32", "--data", str(corpus), "--tokenizer", "bpe",
            "--vocab-size", "2048", "--tokens", str(steps * batch * seq), "--batch-size", str(batch),
            "--seq-len", str(seq), "--device", "cpu", "--seed", "0", "--out", str(out), "--no-progress"]
    for k, v in extra.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args


def lowbit(args: list[str], threads: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "lowbit", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_ok(args: list[str], threads: int = 1) -> None:
    p = lowbit(args, threads)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"lowbit {' '.join(args)} failed ({p.returncode}):\n{err[-3000:]}")


def weights_hash(out: Path) -> str:
    """sha256 of the newest checkpoint's model.safetensors (the final weights)."""
    ckpts = sorted((out / "ckpt").glob("step_*"))
    return hashlib.sha256((ckpts[-1] / "model.safetensors").read_bytes()).hexdigest()


# --- throughput -------------------------------------------------------------------------------------

CONFIGS = [("1 x 1 thread", 1, 1, {}), ("1 x 2 threads", 1, 2, {}), ("2 x 1 thread, DDP", 2, 1, {}),
           ("2 x 1 thread, FSDP2", 2, 1, {"fsdp": True})]


def throughput(corpus: Path, work: Path, steps: int, batch: int, seq: int, passes: int) -> list[dict]:
    rows = []
    for label, nproc, threads, extra in CONFIGS:
        best = 0.0
        for i in range(passes):
            out = work / f"tp-{nproc}-{threads}-{'fsdp' if extra else 'ddp'}-{i}"
            kw = dict(extra, eval_interval=10**9, ckpt_interval=10**9, log_interval=steps)
            if nproc > 1:
                kw["nproc"] = nproc
            run_ok(train_args(corpus, out, steps, batch, seq, **kw), threads)
            best = max(best, json.loads((out / "result.json").read_text())["tokens_per_s"])
        rows.append({"label": label, "nproc": nproc, "threads": threads, "tokens_per_s": best})
        print(f"{label:<22} {best:>10,.0f} tok/s  load {load_avg()}", file=sys.stderr, flush=True)
    return rows


# --- kill and resume --------------------------------------------------------------------------------

def kill_trials(corpus: Path, work: Path, trials: int, steps: int, batch: int, seq: int, ckpt_interval: int,
                nproc: int, seed: int) -> dict:
    common = dict(eval_interval=max(steps // 2, 1), log_interval=1, ckpt_interval=ckpt_interval, keep_last=2)
    if nproc > 1:
        common["nproc"] = nproc
    ref = work / "ref"
    t0 = time.perf_counter()
    run_ok(train_args(corpus, ref, steps, batch, seq, **common))
    step_s = (time.perf_counter() - t0) / steps  # an upper bound (includes start-up): the random delay's range
    want = weights_hash(ref)
    rng = random.Random(seed)
    stats = {"trials": trials, "lost": 0, "killed_mid_checkpoint": 0, "corrupt_skipped": 0, "steps_redone": 0,
             "finished_before_kill": 0}
    for t in range(trials):
        out = work / f"trial-{t}"
        k = rng.randint(1, steps - 2)
        delay = rng.uniform(0, min(step_s, 0.5))
        p = lowbit(train_args(corpus, out, steps, batch, seq, **common), 1)
        metrics = out / "metrics.jsonl"
        while p.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= k):
            time.sleep(0.002)
        time.sleep(delay)
        killed_at = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the whole group: torchrun's agent and every worker
        except ProcessLookupError:
            pass
        p.communicate()
        if p.returncode == 0:
            stats["finished_before_kill"] += 1
        ckpt = out / "ckpt"
        stats["killed_mid_checkpoint"] += any(d.name.startswith((".tmp-", ".old-")) for d in ckpt.glob(".*"))
        r = lowbit(train_args(corpus, out, steps, batch, seq, resume=True, **common), 1)
        _, err = r.communicate()
        stats["corrupt_skipped"] += err.count("falling back to the previous checkpoint")
        m = re.search(r"resumed from .*step_(\d+)", err)
        resumed = int(m.group(1)) if m else 0
        stats["steps_redone"] += max(killed_at - resumed, 0)
        ok = r.returncode == 0 and weights_hash(out) == want
        stats["lost"] += not ok
        print(f"trial {t}: killed after ~{killed_at} steps (+{delay * 1e3:.0f} ms), resumed from step {resumed}: "
              f"{'identical final weights' if ok else 'LOST DATA'}", file=sys.stderr, flush=True)
    return stats


def table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"]
    out = ["| processes x threads | tokens/s | × 1 process, 1 thread |", "|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per throughput run (default: 30)")
    p.add_argument("--batch", type=int, default=16, help="global batch, sequences (default: 16)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default: 128)")
    p.add_argument("--passes", type=int, default=2, help="throughput runs per row, the fastest kept (default: 2)")
    p.add_argument("--trials", type=int, default=5, help="kill-and-resume trials (default: 5; 0 = none)")
    p.add_argument("--kill-steps", type=int, default=24, help="steps of each kill-trial run (default: 24)")
    p.add_argument("--ckpt-interval", type=int, default=2, help="checkpoint interval of the kill trials (default: 2)")
    p.add_argument("--kill-nproc", type=int, default=1, help="processes per kill-trial run (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    p.add_argument("--write", action="store_true", help=f"record the results under '{SECTION}' in {RESULTS.name}")
    args = p.parse_args(argv)
    if args.steps < 2 or args.kill_steps < 4 or args.batch % 2:
        p.error("--steps must be >= 2, --kill-steps >= 4, and --batch even (it is split over 2 processes)")
    import torch

    cmd = "python bench/distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    before, t0 = load_avg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.environ.setdefault("LOWBIT_CACHE", str(work / "cache"))
        corpus = corpus_file(work, max_chars=1_000_000)
        # build the tokenizer/token caches once, outside any timing
        run_ok(train_args(corpus, work / "warm", 1, args.batch, args.seq))
        rows = throughput(corpus, work, args.steps, args.batch, args.seq, args.passes)
        kills = kill_trials(corpus, work, args.trials, args.kill_steps, args.batch, args.seq, args.ckpt_interval,
                            args.kill_nproc, args.seed) if args.trials else None
    wall = time.perf_counter() - t0
    lines = [
        SECTION, "",
        f"Command: `{cmd.strip()}`", "",
        f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, gloo; model tiny, recipe "
        f"fp32, global batch {args.batch} x {args.seq} tokens in every row (2 processes: {args.batch // 2} sequences "
        f"each), {args.steps} steps per run, best of {args.passes}; {wall:.0f} s in all. Load average (1 min): "
        f"{before} before, {load_avg()} after.", "",
        table(rows), "",
    ]
    if kills:
        k = kills
        lines += [
            f"Kill-and-resume: {k['trials']} trials of a {args.kill_steps}-step run ({args.kill_nproc} process"
            f"{'es' if args.kill_nproc > 1 else ''}, checkpoint every {args.ckpt_interval} steps), each SIGKILLed at a "
            f"random moment (seed {args.seed}) and resumed with --resume: **{k['lost']} lost data** (final weights "
            f"differing in any bit from an uninterrupted run, or a failed resume). "
            f"{k['killed_mid_checkpoint']} kills landed inside a checkpoint write (temp directory left behind, "
            f"cleaned on resume); {k['corrupt_skipped']} corrupt checkpoints were skipped; "
            f"{k['steps_redone']} steps were recomputed in all (the work since the last checkpoint); "
            f"{k['finished_before_kill']} runs finished before the kill arrived.", "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 1 if kills and kills["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
