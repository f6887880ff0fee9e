"""`lowbit inspect RUN_DIR` (lowbit.precision): where a run loses precision, from its quant_stats.jsonl (lowbit.train.qstats).

    precision_matrix(records, stat, step)   the array a heatmap draws: layers × (GeMM, operand) columns
    over_time(records, stat)                layers × steps, the stat averaged over each layer's operands
    worst(records, stat, step, n)           the n (layer, GeMM, operand) cells with the largest value
    figure(records, over_time=False)        a matplotlib Figure: relative error and underflow panels
    load_matrix(records)                    MoE: layers × experts share of the routed tokens at the last step
    inspect_run(run_dir, over_time, top)    the text report; writes RUN_DIR/precision.png (and moe_load.png)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lowbit.nn.stats import GEMMS
from lowbit.train import qstats

OPERAND_ORDER = ("input", "weight", "grad_output")
PANELS = (("rel_err", "relative error ‖Q(x) − x‖ / ‖x‖"), ("underflow", "underflow (nonzero → 0)"))


def _layers(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["layer"], None)
    return list(seen)  # module order (records are written in it)


def last_step(records: list[dict]) -> int | None:
    return max((r["step"] for r in records), default=None)


def columns(records: list[dict]) -> list[tuple[str, str]]:
    """(gemm, operand) pairs present, in GeMM then operand order."""
    have = {(r["gemm"], r["operand"]) for r in records}
    return [(g, o) for g in GEMMS for o in OPERAND_ORDER if (g, o) in have]


def precision_matrix(records: list[dict], stat: str, step: int | None = None
                     ) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """(layers, columns, values [len(layers), len(columns)]) of `stat` at `step` (default: the last);
    NaN where a layer has no such record."""
    step = last_step(records) if step is None else step
    rs = [r for r in records if r["step"] == step]
    layers, cols = _layers(rs), columns(rs)
    a = np.full((len(layers), len(cols)), np.nan)
    li, ci = {name: i for i, name in enumerate(layers)}, {c: j for j, c in enumerate(cols)}
    for r in rs:
        v = r.get(stat)
        if v is not None:
            a[li[r["layer"]], ci[(r["gemm"], r["operand"])]] = v
    return layers, cols, a


def over_time(records: list[dict], stat: str) -> tuple[list[str], list[int], np.ndarray]:
    """(layers, steps, values [layers, steps]): the mean of `stat` over each layer's (GeMM, operand) records."""
    layers, steps = _layers(records), sorted({r["step"] for r in records})
    sums, counts = np.zeros((len(layers), len(steps))), np.zeros((len(layers), len(steps)))
    li, si = {n: i for i, n in enumerate(layers)}, {s: j for j, s in enumerate(steps)}
    for r in records:
        v = r.get(stat)
        if v is not None and math.isfinite(v):
            sums[li[r["layer"]], si[r["step"]]] += v
            counts[li[r["layer"]], si[r["step"]]] += 1
    with np.errstate(invalid="ignore"):
        return layers, steps, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def worst(records: list[dict], stat: str, step: int | None = None, n: int = 5) -> list[dict]:
    """The n records at `step` (default: the last) with the largest finite `stat`, largest first."""
    step = last_step(records) if step is None else step
    rs = [r for r in records if r["step"] == step and isinstance(r.get(stat), (int, float)) and math.isfinite(r[stat])]
    return sorted(rs, key=lambda r: -r[stat])[:n]


def shared_limits(runs: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """{stat: (0, the largest finite value at any run's last step)} for PANELS' statistics: one colour scale for
    the heatmaps of one comparison, so a colour means the same number in every recipe's plot."""
    out = {}
    for stat, _ in PANELS:
        tops = [np.nanmax(a) for recs in runs.values() if recs
                for a in [precision_matrix(recs, stat)[2]] if a.size and np.isfinite(a).any()]
        out[stat] = (0.0, float(max(tops)) if tops else 1.0)
    return out


def figure(records: list[dict], over_time_view: bool = False, title: str = "",
           limits: dict[str, tuple[float, float]] | None = None):
    """Two heatmaps (relative error, underflow): layers × (GeMM, operand) at the last step, or layers × steps.
    limits: {stat: (vmin, vmax)} of each panel's colour scale (shared_limits), else each panel's own range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = _layers(records)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.28 * max(len(layers), 4)), squeeze=False)
    for ax, (stat, label) in zip(axes[0], PANELS):
        if over_time_view:
            rows, steps, a = over_time(records, stat)
            xlabels, xlabel = [str(s) for s in steps], "step"
        else:
            rows, cols, a = precision_matrix(records, stat)
            xlabels, xlabel = [f"{g}\n{o}" for g, o in cols], f"GeMM / operand (step {last_step(records)})"
        vmin, vmax = (limits or {}).get(stat, (None, None))
        im = ax.imshow(a, aspect="auto", cmap="magma_r", interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        step_x = max(1, len(xlabels) // 12)
        ax.set_xticks(range(0, len(xlabels), step_x), xlabels[::step_x], fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title or "quantization statistics per layer")
    fig.tight_layout()
    return fig


def report_text(records: list[dict], top: int = 5) -> str:
    step = last_step(records)
    out = [f"step {step}: {len(_layers(records))} quantized layers"]
    for stat, label in (("rel_err", "relative error"), ("underflow", "underflow"), ("saturated", "saturated")):
        rows = worst(records, stat, n=top)
        if not rows or all(r[stat] == 0 for r in rows):
            out.append(f"\nworst by {label}: none above 0")
            continue
        out.append(f"\nworst by {label}:")
        out += [f"  {r[stat]:9.4g}  {r['layer']}  {r['gemm']}/{r['operand']}" for r in rows]
    return "\n".join(out)


def load_matrix(records: list[dict]) -> tuple[list[str], np.ndarray]:
    """(MoE layer names, [layers, experts] share of the routed (token, choice) pairs) at the last recorded step of
    moe_load.jsonl; equal load is 1/experts in every cell."""
    step = last_step(records)
    rows = [r for r in records if r["step"] == step]
    return [r["layer"] for r in rows], np.array([np.array(r["tokens"], float) / max(sum(r["tokens"]), 1)
                                                 for r in rows])


def load_figure(records: list[dict], title: str = ""):
    """Heatmap of load_matrix: one row per MoE layer, one column per expert."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, share = load_matrix(records)
    fig = Figure(figsize=(max(4.0, 0.35 * share.shape[1] + 2.5), 0.45 * len(layers) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(share * share.shape[1], aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_title(f"{title}: routed tokens per expert ÷ mean, step {last_step(records)}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def load_text(records: list[dict]) -> str:
    out = [f"\nMoE load at step {last_step(records)} (tokens per expert ÷ mean; 1 = balanced):"]
    for r in (r for r in records if r["step"] == last_step(records)):
        b = r["bias"]
        out.append(f"  {r['layer']}: max/mean {r['max_over_mean']:.2f}, min/mean "
                   f"{min(r['tokens']) * len(r['tokens']) / max(sum(r['tokens']), 1):.2f}, "
                   f"bias in [{min(b):+.4f}, {max(b):+.4f}]")
    return "\n".join(out)


def inspect_run(run_dir, over_time_view: bool = False, top: int = 5) -> str:
    """The report of RUN_DIR's quant_stats.jsonl; writes RUN_DIR/precision.png (an MoE run: also moe_load.png
    and the load per layer). ValueError when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} does not exist or is not a directory; pass a run directory (lowbit train --out)")
    records, load = qstats.read(run_dir), qstats.read(run_dir, qstats.MOE_FILE)
    if not records and not load:
        raise ValueError(f"{run_dir} has no {qstats.FILE}: train with a quantized recipe and statistics on "
                         "(--stats-interval, default every --log-interval steps)")
    out = []
    if records:
        import matplotlib.pyplot as plt

        fig = figure(records, over_time_view, title=str(run_dir))
        fig.savefig(run_dir / "precision.png", dpi=110)
        plt.close(fig)  # a pyplot figure: closed, or it stays registered
        out += [report_text(records, top), f"\nwrote {run_dir / 'precision.png'}"]
    if load:
        load_figure(load, title=run_dir.name).savefig(run_dir / "moe_load.png", dpi=110)
        out += [load_text(load), f"\nwrote {run_dir / 'moe_load.png'}"]
    return "\n".join(out)
