"""Zero-shot accuracy of finished comparisons (issue 25's evidence): `lowbit eval --tasks lowbit` on every run,
kept as the comparison's eval.json plus each run's validation loss, and one table per comparison.

    lowbit compare --recipes bf16,fp8-tensor,fp4-direct,fp4-paper --model tiny --tokens 300k --out runs/cmp \\
        --eval-tasks lowbit
    python bench/zero_shot.py --keep runs/cmp readme300k   # copies eval.json + val losses to bench/zero_shot/
    python bench/zero_shot.py --write                       # tables from the kept files into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import cpu_description, write_section  # bench/ is on sys.path when a script here runs

HERE = Path(__file__).parent
KEEP = HERE / "zero_shot"
SECTION = "## Zero-shot accuracy of the comparisons (bench/zero_shot.py)"


def keep(cmp_dir: Path, name: str) -> None:
    results = json.loads((cmp_dir / "results.json").read_text())
    summary = json.loads((cmp_dir / "eval.json").read_text())
    summary["val_loss"] = {lab: r.get("final_val_loss") for lab, r in results["runs"].items()}
    summary["command"] = results.get("command")
    summary["machine"] = cpu_description()
    KEEP.mkdir(exist_ok=True)
    (KEEP / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")


def table(s: dict) -> str:
    from lowbit.downstream.table import markdown_section

    lines = markdown_section(s)[2:]  # without the section title
    ref = s["reference"]
    loss = " · ".join(f"`{lab}` {v:.4f}" + (f" ({100 * (v / s['val_loss'][ref] - 1):+.2f}%)" if lab != ref else "")
                      for lab, v in s["val_loss"].items() if v is not None)
    return f"`{s['command']}` (machine: {s['machine']})\n\nValidation loss: {loss}.\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", nargs=2, metavar=("CMP_DIR", "NAME"), help="keep a finished comparison's evaluation")
    p.add_argument("--write", action="store_true", help=f"record the tables under '{SECTION}' in bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.keep:
        keep(Path(args.keep[0]), args.keep[1])
    parts = [f"### {f.stem}\n\n{table(json.loads(f.read_text()))}" for f in sorted(KEEP.glob("*.json"))]
    print("\n\n".join(parts))
    if args.write:
        write_section(SECTION, f"{SECTION}\n\n" + "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
