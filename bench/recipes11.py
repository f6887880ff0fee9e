"""The eleven-recipe comparison (the changed and new recipes of issue 11) at the README's budget.

    lowbit compare --recipes bf16,fp8-tensor,fp8-rowwise,fp8-block,mxfp8,fp4-direct,fp4-paper,fp4-paper-allfp4,\\
        mxfp4,nvfp4,quartet --model tiny --tokens 300k --seed 1 --out runs/ev11
    python bench/recipes11.py --runs runs/ev11 --write   # copies each run's result.json to bench/ev11/, table

The table is rebuilt from bench/ev11/results.json (kept in the repository) when --runs is not given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _results import write_section  # bench/ is on sys.path when a script here runs
from evidence import seven_table

HERE = Path(__file__).parent
KEEP = HERE / "ev11"
SECTION = "## Eleven recipes at the README's budget (bench/recipes11.py)"
NAMES = ["bf16", "fp8-tensor", "fp8-rowwise", "fp8-block", "mxfp8", "fp4-direct", "fp4-paper", "fp4-paper-allfp4",
         "mxfp4", "nvfp4", "quartet"]


def keep(runs: Path) -> None:
    """Copy the comparison's results.json and every run's result.json (small summaries) into bench/ev11/."""
    KEEP.mkdir(exist_ok=True)
    shutil.copy(runs / "results.json", KEEP / "results.json")
    for name in NAMES:
        src = runs / "runs" / name / "result.json"
        if src.exists():
            shutil.copy(src, KEEP / f"{name}.result.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, help="the comparison's --out directory (default: the kept bench/ev11)")
    p.add_argument("--write", action="store_true", help=f"record the table under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.runs:
        keep(args.runs)
    res = json.loads((KEEP / "results.json").read_text())
    m = res.get("machine", {})
    body = (f"{SECTION}\n\nCommand: see this script's docstring. Machine: {m.get('cpu', '?')} "
            f"({m.get('cpu_cores', '?')} cores; flags {m.get('cpu_flags', '?')}; bf16 GeMMs "
            f"{m.get('cpu_bf16_gemm', '?')}), torch {m.get('torch', '?')}. 0.23 training tokens per parameter: "
            "the fast first descent, not the regime of published comparisons (D/N >= 25).\n\n"
            + seven_table(res, NAMES, seed=1) + "\n")
    warn = (res.get("timing") or {}).get("warnings") or []
    if warn:
        body += "\nThe comparison warned (its step-time ratios are loose; bench/train.py measures them on a quiet " \
                "machine):\n" + "".join(f"- {w}\n" for w in warn)
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
