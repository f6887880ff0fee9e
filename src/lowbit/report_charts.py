"""The comparison report's iso-loss pieces (table cells, bars), seed bands and per-layer precision heatmaps
(lowbit.precision), beside lowbit.report. Rendering only: they read a results dict and the runs' files, and write PNGs."""
from __future__ import annotations

import math
from pathlib import Path

from lowbit.comparison.isoloss import ISO_TOLERANCE

ISO_PNG = "iso_loss.png"
_ISO_BARS = (("step_time_rel", "step time"), ("iso_token_ratio", "tokens to the reference's loss"),
             ("matched_loss_cost", "matched-loss cost"))


def iso_cell(r: dict, key: str) -> str:
    """A report-table cell of an iso-loss value: the ratio, "not reached" for a finished run that never got to
    the target, else "–"."""
    v = r.get(key)
    if _finite(v):
        return f"{v:.2f}×"
    return "not reached" if r.get("status") == "ok" and r.get("iso_tokens") is None and "iso_tokens" in r else "–"


def iso_series(results: dict) -> tuple[list[str], dict[str, list[float]], list[str]]:
    """(labels, {bar key: values}, the labels that never reached the reference's loss) the iso-loss chart draws:
    every finished run with a step-time ratio or a token ratio (NaN where a value is missing)."""
    runs = results.get("runs", {})
    labels = [lab for lab, r in runs.items() if r.get("status") == "ok"
              and (_finite(r.get("iso_token_ratio")) or _finite(r.get("step_time_rel")))]
    unreached = [lab for lab in labels if "iso_tokens" in runs[lab] and runs[lab]["iso_tokens"] is None]
    return labels, {k: [runs[lab][k] if _finite(runs[lab].get(k)) else math.nan for lab in labels]
                    for k, _ in _ISO_BARS}, unreached


def plot_iso_loss(results: dict, path: Path) -> Path | None:
    """Grouped bars per recipe: step time, tokens to the reference's loss, matched-loss cost (all relative to
    the reference, 1 = the same); a run that never reached the loss keeps its step-time bar and is marked
    "not reached". None (nothing written) when no run has a bar."""
    labels, series, unreached = iso_series(results)
    if not labels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(labels) + 2), 4.2))
    w = 0.8 / len(_ISO_BARS)
    for i, (key, name) in enumerate(_ISO_BARS):
        ax.bar([j + (i - 1) * w for j in range(len(labels))], series[key], w, label=name)
    for j, lab in enumerate(labels):
        if lab in unreached:
            ax.text(j + w / 2, 1.0, "not reached", rotation=90, ha="center", va="bottom", fontsize=7, color="C3")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"× {results.get('reference')}")
    ax.set_title(f"cost of reaching the reference's final validation loss\n(within {ISO_TOLERANCE:.1%}; "
                 "1 = the reference)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_band_series(per_seed: dict[int, dict]) -> dict[str, tuple[list, list, list, list]]:
    """{label: (tokens, mean, low, high)} of the validation curves over seeds: at each evaluation point every seed
    that has it (same config per seed, so the same points), mean and min..max."""
    from lowbit.comparison.isoloss import val_curve

    by_label: dict[str, dict[float, list[float]]] = {}
    for res in per_seed.values():
        for label, r in res.get("runs", {}).items():
            for t, v in val_curve(r.get("history")):
                by_label.setdefault(label, {}).setdefault(t, []).append(v)
    out = {}
    for label, pts in by_label.items():
        ts = sorted(pts)
        out[label] = (ts, [sum(pts[t]) / len(pts[t]) for t in ts], [min(pts[t]) for t in ts],
                      [max(pts[t]) for t in ts])
    return out


def plot_seed_band(per_seed: dict[int, dict], reference: str | None, path: Path) -> Path | None:
    """Validation loss against tokens per recipe: the mean over seeds and the band from the lowest to the highest
    seed. None (nothing written) without curves."""
    series = seed_band_series(per_seed)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (ts, mean, lo, hi) in series.items():
        (line,) = ax.plot(ts, mean, label=label, lw=2.2 if label == reference else 1.4)
        ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss over seeds {', '.join(map(str, sorted(per_seed)))} (mean, min-max band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_precision_plots(results: dict, out: Path) -> dict[str, str]:
    """precision_<label>.png (lowbit.precision's heatmaps) for every run with per-layer statistics, on one colour
    scale per statistic."""
    import matplotlib.pyplot as plt

    from lowbit import precision
    from lowbit.train import qstats

    runs = {label: qstats.read(Path(out) / "runs" / label) for label in results.get("runs", {})}
    limits = precision.shared_limits(runs)  # one colour scale: a colour is the same number in every plot
    plots = {}
    for label, recs in runs.items():
        if recs:
            fig = precision.figure(recs, title=f"{label}: quantization statistics per layer", limits=limits)
            fig.savefig(Path(out) / f"precision_{label}.png", dpi=100)
            plt.close(fig)
            plots[label] = f"precision_{label}.png"
    return plots


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
