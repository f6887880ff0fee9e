"""Rebuild lowbit's published-reference tables (src/lowbit/references/*.json) from local copies of the
source repositories' data files. The tables hold numbers taken from those files (final losses, fitted
constants) with the repository, path and commit they came from; nothing else of the repositories.

    python bench/reference_tables.py --quartet2 PATH/Quartet-II --quest PATH/QuEST

PATH/... are git checkouts (or bare git directories) of IST-DASLab/Quartet-II and IST-DASLab/QuEST.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lowbit" / "references"
# Quartet II's scheme keys -> the variant kept (the headline configuration of each: NVIDIA's recipe without
# Four Over Six; Quartet II with Hadamard 128, no delayed amax, no Four Over Six -- the variant run at every
# size and D/N), and the lowbit recipe closest to each.
SCHEMES = {
    "nvidia": ({"sfour_over_six": False}, "nvfp4", "NVIDIA's NVFP4 recipe"),
    "tetrajetv2": ({}, None, "TetraJet-v2"),
    "quartetv2": ({"shadamard_dim": 128, "sdelayed_amax": False, "sfour_over_six": False}, "quartet",
                  "Quartet II"),
}


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def quartet2(repo: Path) -> dict:
    path = "for_plots/runs.json"
    commit = _git(repo, "log", "-1", "--format=%H", "HEAD", "--", path).strip()
    runs = json.loads(_git(repo, "show", f"{commit}:{path}"))
    base = {(r["Nstr"], round(r["D/N"])): r for r in runs["baseline"]}
    schemes = {}
    for key, (match, lowbit, label) in SCHEMES.items():
        seen, rows = set(), []
        for r in runs[key]:
            if any(r.get(k) != v for k, v in match.items()):
                continue
            cell = (r["Nstr"], round(r["D/N"]))
            if cell in seen or cell not in base:
                continue
            seen.add(cell)
            b = base[cell]["final_loss"]
            rows.append({"size": f"{r['Nstr']}M", "N": r["N"], "D": r["D"], "D_over_N": round(r["D/N"], 2),
                         "loss": round(r["final_loss"], 5), "bf16_loss": round(b, 5),
                         "gap_pct": round(100 * (r["final_loss"] / b - 1), 3)})
        schemes[key] = {"label": label, "lowbit_recipe": lowbit, "variant": match,
                        "points": sorted(rows, key=lambda x: (x["N"], x["D"]))}
    return {"source": {"repo": "IST-DASLab/Quartet-II", "path": path, "commit": commit},
            "what": "final C4 validation losses of simulated-FP4 Llama-style pre-training runs, BF16 baseline "
                    "at the same N and D; gap_pct = 100 (loss / bf16_loss - 1)",
            "parameter_count": "N = non-embedding parameters (all but the token embedding and the output head)",
            "schemes": schemes}


def quest(repo: Path) -> dict:
    nb_path, runs_path = "notebooks/plots.ipynb", "for_plots/runs_for_scaling.json"
    commit = _git(repo, "log", "-1", "--format=%H", "HEAD", "--", nb_path, runs_path).strip()
    nb = json.loads(_git(repo, "show", f"{commit}:{nb_path}"))
    text = next("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])
                if "eff(fp4)" in "".join(o.get("text", "")))
    vals = {}
    for line in text.splitlines():
        if "=" in line and "(fixed)" not in line:
            k, v = (s.strip() for s in line.split("=", 1))
            vals[k] = float(v)
    n_runs = len(json.loads(_git(repo, "show", f"{commit}:{runs_path}")))
    return {"source": {"repo": "IST-DASLab/QuEST", "path": nb_path, "commit": commit, "runs": runs_path,
                       "n_runs": n_runs},
            "form": "L = E + A / (N * eff)^alpha + B / D^beta  (N non-embedding parameters, D tokens; eff(bf16)=1)",
            "A": vals["A"], "alpha": vals["alpha"], "B": vals["B"], "beta": vals["beta"], "E": vals["E"],
            "eff": {"fp4": vals["eff(fp4)"], "int8": vals["eff(8)"], "int4": vals["eff(4)"],
                    "int2": vals["eff(2)"], "int1": vals["eff(1)"], "bf16": 1.0},
            "what": "the scaling-law fit of QuEST's notebook over its runs (C4, Llama-style, 30M-800M, D/N ~ 100); "
                    "eff = parameter efficiency: a quantized model of N parameters behaves as a bf16 one of eff*N"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quartet2", type=Path, required=True)
    p.add_argument("--quest", type=Path, required=True)
    a = p.parse_args()
    OUT.mkdir(exist_ok=True)
    for name, data in (("quartet2_runs.json", quartet2(a.quartet2)), ("quest_fit.json", quest(a.quest))):
        (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
