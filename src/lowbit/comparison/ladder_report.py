"""The ladder's report: `ladder.json`, `ladder.md` (table, verdicts against the published numbers, the scaling fit)
and `ladder.png` (gap to bf16 against D/N per recipe and size, Quartet II's points beside).

Verdict rules (each "holds" / "does not hold" / "not resolved at this scale"): a gap counts as above (below) zero
when its 95% seed interval lies above (below) zero; with one seed, when it is more than twice the seed spread of
the gaps measured in cells with several seeds (no such cell: the sign alone).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from lowbit._io import write_json
from lowbit.comparison import references, scaling

FP4 = ("fp4-direct", "fp4-paper", "nvfp4", "quartet", "mxfp4", "fp4-paper-allfp4", "nvfp4-4over6")
MIN_DN = 25  # the published comparisons start at D/N = 25


def noise(rows: list[dict]) -> float | None:
    """Pooled seed sd of the gaps (in %) over rows with several seeds."""
    sds = [r["gap_pct_sd"] for r in rows if r.get("gap_pct_sd") is not None]
    return statistics.fmean(sds) if sds else None


def sign(row: dict, sd: float | None) -> int:
    """+1 / -1 when the gap is resolved above / below zero (module docstring), else 0."""
    g, ci = row.get("gap_pct"), row.get("gap_pct_ci95")
    if g is None:
        return 0
    if ci:
        return 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0
    if sd is not None:
        return 1 if g > 2 * sd else -1 if g < -2 * sd else 0
    return 1 if g > 0 else -1 if g < 0 else 0


def _fmt(r: dict) -> str:
    ci = r.get("gap_pct_ci95")
    return f"{r['recipe']} {r['model']} D/N={r['dn']:g}: {r['gap_pct']:+.2f}%" + (
        f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _verdict(ok: list[bool], bad: list[bool], evidence: list[str]) -> dict:
    if not ok:
        return {"status": "not resolved at this scale", "evidence": "no cells"}
    status = "holds" if all(ok) else "does not hold" if any(bad) else "not resolved at this scale"
    return {"status": status, "evidence": "; ".join(evidence)}


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """(a)-(f) of issue 15 from the aggregated rows (see the module docstring for the rules)."""
    sd = noise(rows)
    at = {(r["recipe"], r["model"], r["dn"]): r for r in rows if r.get("gap_pct") is not None}
    big = [r for r in at.values() if r["dn"] >= MIN_DN]
    out = {}
    fp4 = [r for r in big if r["recipe"] in FP4]
    out["a"] = dict(claim="at D/N >= 25 every FP4 recipe ends above bf16, by roughly +1% to +3.5%",
                    **_verdict([sign(r, sd) > 0 for r in fp4], [sign(r, sd) < 0 for r in fp4], map(_fmt, fp4)))
    ok, bad, ev = [], [], []
    for rec, model in sorted({(r["recipe"], r["model"]) for r in fp4}):
        pts = sorted((r["dn"], r) for (k, m, _), r in at.items() if k == rec and m == model and r["dn"] >= MIN_DN)
        if len(pts) >= 2:
            lo, hi = pts[0][1], pts[-1][1]
            diff = {"recipe": rec, "model": model, "dn": hi["dn"], "gap_pct": hi["gap_pct"] - lo["gap_pct"]}
            s = sign(diff, sd)
            ok.append(s > 0), bad.append(s < 0)
            ev.append(f"{rec} {model}: {lo['gap_pct']:+.2f}% at {lo['dn']:g} -> {hi['gap_pct']:+.2f}% at {hi['dn']:g}")
    out["b"] = dict(claim="the FP4 gap grows with D/N", **_verdict(ok, bad, ev))
    out["c"] = dict(claim="NVIDIA's NVFP4 recipe (nvfp4) has a gap >= quartet's",
                    **_pairwise(at, "nvfp4", "quartet", sd, lambda d: d >= 0))
    fp8 = [r for r in big if r["recipe"] == "fp8-tensor"]
    out["d"] = dict(claim="fp8-tensor within 0.5% of bf16",
                    **_verdict([abs(r["gap_pct"]) <= 0.5 for r in fp8], [abs(r["gap_pct"]) > 0.5 for r in fp8],
                               map(_fmt, fp8)))
    out["e"] = dict(claim="fp4-paper ends below fp4-direct", **_pairwise(at, "fp4-direct", "fp4-paper", sd,
                                                                          lambda d: d > 0))
    paper = [r for r in big if r["recipe"] == "fp4-paper"]
    out["f"] = dict(claim="the FP4 paper's claim: fp4-paper within 2% of bf16 at D/N >= 25",
                    **_verdict([r["gap_pct"] <= 2 for r in paper], [r["gap_pct"] > 2 for r in paper],
                               map(_fmt, paper)))
    return out


def _pairwise(at: dict, hi: str, lo: str, sd, good) -> dict:
    """Cells where both recipes ran: gap(hi) - gap(lo), judged with `good` when resolved beyond the noise."""
    ok, bad, ev = [], [], []
    for (rec, model, dn), r in sorted(at.items()):
        other = at.get((lo, model, dn))
        if rec != hi or other is None or dn < MIN_DN:
            continue
        d = r["gap_pct"] - other["gap_pct"]
        s = sign({"gap_pct": d}, sd * 2 ** 0.5 if sd else None)  # a difference of two gaps: sqrt(2) the spread
        ok.append(good(d) and s != 0), bad.append(not good(d) and s != 0)
        ev.append(f"{model} D/N={dn:g}: {hi} {r['gap_pct']:+.2f}% vs {lo} {other['gap_pct']:+.2f}%")
    return _verdict(ok, bad, ev)


def plot_series(rows: list[dict], count: str = "reference") -> dict:
    """What ladder.png draws: {"lowbit": {(recipe, model): [(D/N, gap, lo, hi)]}, "reference": {scheme: [...]}}."""
    series: dict = {}
    for r in sorted(rows, key=lambda r: r["dn"]):
        if r["recipe"] == "bf16" or r.get("gap_pct") is None:
            continue
        ci = r.get("gap_pct_ci95") or [r["gap_pct"], r["gap_pct"]]
        series.setdefault((r["recipe"], r["model"]), []).append((r["d_over_n"][count], r["gap_pct"], *ci))
    ref = {}
    for p in references.quartet2_points():
        ref.setdefault(p["scheme"], []).append((p["D_over_N"], p["gap_pct"], p["size"]))
    return {"lowbit": series, "reference": ref}


def fit_points(rows: list[dict], cells: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """{recipe: [(N reference count, D, val loss)]}, one point per finished run (every seed)."""
    n_of = {(r["model"], r["dn"]): r["n_reference"] for r in rows}
    pts: dict[str, list] = {}
    for c in cells:
        for lab, loss in c["val_loss"].items():
            if isinstance(loss, (int, float)) and (c["model"], c["dn"]) in n_of:
                pts.setdefault(lab, []).append((n_of[(c["model"], c["dn"])], c["tokens"], loss))
    return pts


_COLORS = {"fp8-tensor": "tab:blue", "fp4-direct": "tab:orange", "fp4-paper": "tab:green", "nvfp4": "tab:red",
           "quartet": "tab:purple", "mxfp4": "tab:brown", "fp8-block": "tab:cyan", "mxfp8": "tab:olive"}


def recipe_color(name: str | None) -> str:
    return _COLORS.get(name or "", "tab:gray")


def draw(series: dict, path: Path, count: str = "reference") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    models = sorted({m for _, m in series["lowbit"]})
    markers = dict(zip(models, "os^Dv"))
    for (rec, model), pts in series["lowbit"].items():
        x, y, lo, hi = zip(*pts)
        ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], marker=markers[model],
                    color=recipe_color(rec), capsize=3, label=f"{rec} · {model}")
    names = {"nvidia": "nvfp4", "quartetv2": "quartet", "tetrajetv2": None}
    for scheme, pts in series["reference"].items():
        pts = sorted(pts)
        color = recipe_color(names[scheme]) if names.get(scheme) else "0.5"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], facecolors="none", edgecolors=color, marker="o",
                   alpha=0.6, s=18, label=f"Quartet II table: {scheme} (30M-200M)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"training tokens per parameter D/N ({count} count)")
    ax.set_ylabel("final validation loss gap to bf16 (%)")
    ax.set_title("lowbit ladder (filled, 95% seed interval) beside Quartet II's published runs (hollow)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    out = ["| model | N (ref.) | N (total) | D | D/N (ref.) | D/N (total) | recipe | seeds | val loss | gap to bf16 "
           "| 95% interval |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["dn"], r["recipe"] != "bf16")):
        ci = r.get("gap_pct_ci95")
        gap = "ref." if r["recipe"] == "bf16" else (f"{r['gap_pct']:+.2f}%" if r["gap_pct"] is not None else "n/a")
        loss = f"{r['val_loss_mean']:.4f}" if r["val_loss_mean"] is not None else "n/a"
        out.append(f"| {r['model']} | {r['n_reference']:,} | {r['n_total']:,} | {r['tokens']:,} | "
                   f"{r['d_over_n']['reference']:.1f} | {r['d_over_n']['total']:.1f} | {r['recipe']} | {r['seeds']} | "
                   f"{loss} | {gap} | {f'[{ci[0]:+.2f}, {ci[1]:+.2f}]' if ci else ''} |")
    return "\n".join(out)


def write_report(agg: dict, out, meta: dict | None = None) -> dict:
    """Write ladder.json, ladder.md and ladder.png into `out`; returns the report dict (ladder.json's content)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    count = (meta or {}).get("count", "reference")
    fit = scaling.fit(fit_points(agg["rows"], agg["cells"]))
    quest = references.quest_fit()
    report = {**(meta or {}), **agg, "verdicts": verdicts(agg["rows"]), "fit": fit,
              "references": {k: references.citation(k) for k in references.FILES},
              "quest_eff_fp4": quest["eff"]["fp4"]}
    write_json(out / "ladder.json", report)
    series = plot_series(agg["rows"], count)
    draw(series, out / "ladder.png", count)
    lines = ["# lowbit ladder", "", f"Command: `{(meta or {}).get('command', '')}`", "",
             "N (ref.): parameters as QuEST and Quartet II count them (all but the token embedding and the output "
             "head); N (total): every parameter. Gap: 100·(loss / bf16 loss − 1), paired per seed; interval: 95% "
             "Student t over seeds.", "", table(agg["rows"]), "", "## Verdicts against the published numbers", ""]
    for k, v in report["verdicts"].items():
        lines.append(f"- ({k}) {v['claim']}: **{v['status']}** — {v['evidence']}")
    lines += ["", "## Scaling fit (QuEST's form)", ""]
    if fit["status"] == "fitted":
        effs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(fit["eff"].items()))
        lines.append(f"L = {fit['E']:.3f} + {fit['A']:.3g}/(N·eff)^{fit['alpha']:.3f} + {fit['B']:.3g}/D^"
                     f"{fit['beta']:.3f}; parameter efficiency: {effs} (QuEST's FP4: {quest['eff']['fp4']:.2f}; "
                     f"at the search bound: {', '.join(fit['eff_at_bound']) or 'none'})")
    else:
        lines.append(fit["status"])
    lines += ["", "References: " + "; ".join(report["references"].values()), ""]
    (out / "ladder.md").write_text("\n".join(lines))
    return report
