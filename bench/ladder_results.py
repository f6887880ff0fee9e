"""The tokens-per-parameter ladder of issue 15, recorded in bench/RESULTS.md from the kept summaries.

    # the runs (two processes; each finished run's result.json is kept in bench/ladder/, the ladder resumes from it)
    lowbit ladder $LADDER --shard 0/2 &  lowbit ladder $LADDER --shard 1/2
    python bench/ladder_results.py --write        # rebuilds the report from bench/ladder/ alone (no training)

LADDER below is the command's options. The section gives the table, the verdicts, the fit, the wall time (the sum
of the runs' wall times, and per process) and the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _results import cpu_description, write_section  # bench/ is on sys.path when a script here runs

HERE = Path(__file__).parent
KEEP = HERE / "ladder"
SECTION = "## Tokens-per-parameter ladder beside the published tables (bench/ladder_results.py)"
LADDER = ("--models llama-nano,llama-micro --dn 25,100 --recipes bf16,fp8-tensor,fp4-direct,fp4-paper,nvfp4,quartet "
          "--seeds 1,2,3 --seeds-at 25 --data debian-docs --batch-size 32 --lr 2e-3 --stats-interval 0 "
          "--eval-batches 16 --high-precision none --out runs/ladder --keep bench/ladder")


NOTES = """Read with: `nvfp4` runs with `--high-precision none` (NVIDIA's numerics on every block: its 16% BF16 share
would be the whole one-block llama-nano and half of llama-micro); the models are 0.05M-0.1M non-embedding
parameters on Linux/Python documentation (13.2M BPE-2048 tokens; D/N = 100 on llama-micro is 0.85 passes), the
published runs 30M-200M on C4, so the comparison is of trends and signs, not of values. D/N = 100 has one seed:
its single-seed gaps count as resolved only beyond twice the seed spread of the D/N = 25 gaps. The fit has four
distinct (N, D) bf16 points for its five constants, so its efficiencies are a reading of these points, not a
law. Session of 2026-12-02: wall clock 16:34-18:19 UTC with two processes (restarted once at 16:53 to run
nvfp4 on every block; finished runs were restored from bench/ladder/). The SR recipes (nvfp4, quartet) drew
torch.rand numbers: the ladder ran on the code before lowbit.rng."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ladder-report", help="where the rebuilt ladder.json/md/png go")
    p.add_argument("--write", action="store_true", help=f"record the section '{SECTION}' in RESULTS.md")
    a = p.parse_args()
    cmd = [sys.executable, "-m", "lowbit", "ladder", *LADDER.replace("--out runs/ladder", f"--out {a.out}").split(),
           "--report-only"]
    subprocess.run(cmd, check=True, capture_output=True)
    md = (Path(a.out) / "ladder.md").read_text()
    walls = [json.loads(f.read_text()).get("wall_time_s") or 0 for f in KEEP.rglob("*.result.json")]
    text = "\n".join([
        SECTION, "",
        f"Command: `lowbit ladder {LADDER}`, run as two processes (`--shard 0/2`, `--shard 1/2`, 1 thread each: "
        f"OMP_NUM_THREADS=1); then `python bench/ladder_results.py --write`.",
        "", f"Machine: {cpu_description()}. {len(walls)} runs, {sum(walls) / 3600:.2f} h of run wall time in all.",
        "", NOTES, "", md.split("\n", 4)[4].replace("## ", "### "),
    ])
    print(text)
    if a.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
