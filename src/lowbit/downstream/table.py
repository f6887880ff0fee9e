"""Zero-shot results as tables: one run (terminal), a comparison (paired differences, report.md section).
Pure functions over eval.json contents; no lm-eval, no torch."""
from __future__ import annotations

from .paired import paired_difference


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def chance(c: float | None) -> str:
    """A chance level as text: "25%", "~0%" (a free-form answer), "–" (unknown: a hub task)."""
    return "–" if c is None else ("~0%" if c == 0 else f"{100 * c:.0f}%")


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    se = row.get("acc_stderr")
    return f"{_pct(row['acc'])} ± {_pct(se)}" if se is not None else _pct(row["acc"])


def run_table(result: dict) -> str:
    """A run's eval.json as text: task, items, chance, acc ± se, acc_norm or perplexity."""
    lines = [f"{'task':<34} {'items':>5} {'chance':>6}  {'acc %':>12}  {'acc_norm %':>10}  {'ppl':>8}"]
    for name, r in result["tasks"].items():
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") is not None else "–"
        lines.append(f"{name:<34} {r['n']:>5} {chance(r.get('chance')):>6}  {_cell(r):>12}  "
                     f"{_pct(r.get('acc_norm')):>10}  {ppl:>8}")
    avg = result.get("average") or {}
    if "acc" in avg:
        lines.append(f"{'average':<34} {'':>5} {'':>6}  {_pct(avg['acc']):>12}  {_pct(avg.get('acc_norm')):>10}")
    return "\n".join(lines)


def paired_rows(per_run: dict, reference: str, names: list[str]) -> dict:
    """{label: {task or "all": paired_difference of acc}} for every run but the reference; "all" pools the
    items of every task (so larger tasks weigh more)."""
    ref = per_run[reference]["tasks"]
    out = {}
    for label, res in per_run.items():
        if label == reference:
            continue
        rows, pooled_a, pooled_r = {}, [], []
        for n in names:
            a, r = res["tasks"][n]["items"]["acc"], ref[n]["items"]["acc"]
            rows[n] = paired_difference(a, r)
            pooled_a += a
            pooled_r += r
        rows["all"] = paired_difference(pooled_a, pooled_r)
        out[label] = rows
    return out


def comparison_summary(per_run: dict, reference: str | None, names: list[str],
                       loss_gaps: dict | None = None) -> dict:
    """The comparison's eval.json: each run's metrics (no per-item lists), the paired differences, and each run's
    validation-loss gap to the reference in % (`loss_gaps`, from results.json: the loss verdict's number)."""
    reference = reference if reference in per_run else next(iter(per_run), None)
    runs = {lab: {"step": r.get("step"), "recipe": r.get("recipe"), "average": r.get("average"),
                  "tasks": {n: {k: v for k, v in r["tasks"][n].items() if k != "items"} for n in names}}
            for lab, r in per_run.items()}
    return {"reference": reference, "tasks": names, "runs": runs,
            "paired": paired_rows(per_run, reference, names) if reference else {}, "loss_gap_pct": loss_gaps or {}}


def _diff(p: dict) -> str:
    return f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]"


def verdict(p: dict) -> str:
    if p["within_noise"]:
        return "within noise"
    return "better than the reference" if p["diff"] > 0 else "worse than the reference"


def markdown_section(summary: dict | None) -> list[str]:
    """The "Zero-shot accuracy" section of report.md ([] without an evaluation)."""
    if not summary or not summary.get("runs"):
        return []
    names, ref = summary["tasks"], summary["reference"]
    first = next(iter(summary["runs"].values()))
    levels = {n: first["tasks"][n].get("chance") for n in names}
    out = ["## Zero-shot accuracy", "",
           "Accuracy (%) ± lm-eval's standard error; weights: the run's fp32 master weights, or a recipe's quantized "
           "GeMMs (`lowbit eval --recipe`). Chance: " + ", ".join(f"`{n}` {chance(c)}" for n, c in levels.items())
           + ".", "", "| run | step | weights | " + " | ".join(f"`{n}`" for n in names) + " | average |",
           "|---|---:|---|" + "---:|" * (len(names) + 1)]
    for lab, r in summary["runs"].items():
        cells = [str(r.get("step")), str(r.get("recipe"))] + [_cell(r["tasks"][n]) for n in names]
        out.append(f"| `{lab}` | " + " | ".join(cells) + f" | {_pct((r.get('average') or {}).get('acc'))} |")
    if summary.get("paired"):
        out += ["", f"Paired difference to `{ref}` in accuracy points, 95% interval over the same items "
                "[mean ± 1.96·se of the per-item differences]; McNemar's exact p over all items:", "",
                "| run | " + " | ".join(f"`{n}`" for n in names) + " | all items | p | accuracy verdict | Δ val loss |",
                "|---|" + "---:|" * (len(names) + 2) + "---|---:|"]
        gaps = summary.get("loss_gap_pct") or {}
        for lab, rows in summary["paired"].items():
            gap = f"{gaps[lab]:+.2f}%" if isinstance(gaps.get(lab), (int, float)) else "–"
            out.append(f"| `{lab}` | " + " | ".join(_diff(rows[n]) for n in names)
                       + f" | {_diff(rows['all'])} | {rows['all']['p']:.3g} | {verdict(rows['all'])} | {gap} |")
    return out + [""]
