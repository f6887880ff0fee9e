"""`lowbit compare --seeds 1,2,3`: the same comparison under several seeds, and what the seeds say together.

Layout: `out/seed<N>/` is one whole comparison per seed (same recipes and sweep; within a seed every run shares
initial weights and batches; each resumes as a comparison does), and `out/seeds.json`, `out/seeds.md`,
`out/seeds_loss.png` aggregate them. Per run label:

    val_loss_mean, val_loss_sd        over the seeds that finished ("ok")
    gap_mean, gap_sd, gap_ci95        the paired gap to the reference (same seed = same weights and batches),
                                      validation loss minus the reference's, with the 95% confidence interval
                                      of its mean (Student's t over the seeds)
    verdict                           "better" / "worse" when the interval excludes 0, else "within noise";
                                      "one seed" with fewer than two paired seeds
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from lowbit._io import write_json

# two-sided 95% critical values of Student's t, t_{0.975, df} for df = 1..30 (standard tables)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """t_{0.975, df}: the table to 30 degrees of freedom, then the Cornish-Fisher expansion around 1.96
    (within 0.001 of the exact value from df 30 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(xs: list[float]) -> tuple[float, float] | None:
    """95% confidence interval (lo, hi) of the mean of xs (Student's t); None for fewer than two values."""
    if len(xs) < 2:
        return None
    m, sd = statistics.fmean(xs), statistics.stdev(xs)
    h = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return m - h, m + h


def verdict(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "one seed"
    return "better" if ci[1] < 0 else "worse" if ci[0] > 0 else "within noise"


def _ok_loss(run: dict | None) -> float | None:
    v = (run or {}).get("final_val_loss")
    return v if (run or {}).get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v) else None


def aggregate(per_seed: dict[int, dict]) -> dict:
    """{"seeds", "reference", "runs": {label: statistics}} from {seed: that seed's results.json dict}."""
    seeds = sorted(per_seed)
    ref = next((per_seed[s].get("reference") for s in seeds if per_seed[s].get("reference")), None)
    labels = list(dict.fromkeys(lab for s in seeds for lab in per_seed[s].get("runs", {})))
    out = {}
    for lab in labels:
        losses = {s: _ok_loss(per_seed[s]["runs"].get(lab)) for s in seeds}
        vals = [v for v in losses.values() if v is not None]
        gaps = [losses[s] - r for s in seeds if losses[s] is not None
                and (r := _ok_loss(per_seed[s]["runs"].get(ref))) is not None]
        ci = t_interval(gaps) if lab != ref else None
        out[lab] = {"val_losses": losses, "val_loss_mean": statistics.fmean(vals) if vals else None,
                    "val_loss_sd": statistics.stdev(vals) if len(vals) > 1 else None,
                    "gap_mean": statistics.fmean(gaps) if gaps else None,
                    "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
                    "gap_ci95": list(ci) if ci else None, "n_paired": len(gaps),
                    "verdict": "reference" if lab == ref else verdict(ci)}
    return {"seeds": seeds, "reference": ref, "runs": out}


def format_table(agg: dict) -> str:
    ref = agg.get("reference")
    lines = [f"| Recipe | Val loss (mean ± sd) | Gap to {ref} (mean) | 95% CI of the gap | Seeds | Verdict |",
             "|---|---:|---:|---:|---:|---|"]

    def f(v, spec):
        return "–" if v is None else format(v, spec)
    for lab, r in agg["runs"].items():
        sd = f" ± {r['val_loss_sd']:.4f}" if r["val_loss_sd"] is not None else ""
        ci = r["gap_ci95"]
        lines.append(f"| {lab} | {f(r['val_loss_mean'], '.4f')}{sd} | {f(r['gap_mean'], '+.4f')} | "
                     f"{'–' if ci is None else f'[{ci[0]:+.4f}, {ci[1]:+.4f}]'} | {r['n_paired']} | {r['verdict']} |")
    return "\n".join(lines)


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def compare_seeds(recipe_list: list, base, out, seeds: list[int], compare_fn, **kwargs) -> dict:
    """Run compare_fn(recipes, base with seed=s, out/seed<s>, **kwargs) for every seed (the timing phase only in
    the first seed), then write seeds.json / seeds.md / seeds_loss.png. Returns the aggregate."""
    import dataclasses

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct seeds, e.g. 1,2,3; got {seeds}")
    per_seed = {}
    for i, s in enumerate(seeds):
        kw = dict(kwargs)
        if i > 0:
            kw["timing_rounds"] = 0  # one timing phase is enough: the seed does not change a step's cost
        per_seed[s] = compare_fn(recipe_list, dataclasses.replace(base, seed=s), seed_dir(out, s), **kw)
    agg = aggregate(per_seed)
    agg["failed"] = [f"{lab} (seed {s})" for s, res in per_seed.items() for lab in res.get("failed", [])]
    write_json(Path(out) / "seeds.json", agg)
    from lowbit.report_charts import plot_seed_band

    plot_seed_band(per_seed, agg.get("reference"), Path(out) / "seeds_loss.png")
    (Path(out) / "seeds.md").write_text(
        f"# Seeds {', '.join(map(str, seeds))}\n\nPaired gaps: each seed's run minus that seed's {agg['reference']} "
        "(same initial weights and batches); 95% confidence interval of the mean gap (Student's t over the "
        "seeds). Verdict: better / worse when the interval excludes 0.\n\n" + format_table(agg)
        + "\n\n![validation loss over seeds](seeds_loss.png)\n\nPer seed: " +
        ", ".join(f"[seed {s}](seed{s}/report.md)" for s in seeds) + "\n")
    return agg
