"""Comparison report: results dict (the content of `results.json`) -> markdown table, loss-curve PNGs and
`report.md`. Pure functions of the results dict (re-render a saved one with
`report.write_report(json.load(open("runs/cmp/results.json")), "runs/cmp")`); nothing here trains or reads run
directories. The dict, written by `lowbit.compare` with gaps filled by lowbit.comparison.records:
    {"reference": "bf16", "reference_note": None | str, "base_config": {TrainConfig fields}, "command": str,
     "machine": {...}, "sweep": None | {param: [values]},
     "runs": {label: {"status": "ok" | "diverged" | "failed: ...", "final_val_loss": float | None, "val_gap_abs",
                      "val_gap_pct", "tokens_per_s", "step_time_rel", "peak_mem_bytes", "quant_stats": {..},
                      "wall_time_s", "history": [{"tokens", "val_loss", ..}], "recipe": base recipe name,
                      "sweep": None | {"param": str, "value": ..}, ...}}}
Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lowbit import report_charts
from lowbit.downstream.table import markdown_section

LOSS_PNG = "loss.png"
REPORT_MD = "report.md"

# Enough distinct (colour, line style) pairs for ~40 runs: tab10 colours cycled against four dash patterns.
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
           "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_STYLES = ("-", "--", "-.", ":")


# --- numbers -----------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def val_curve(run: dict) -> tuple[list[float], list[float]]:
    """(tokens, val_loss) of the history rows that carry a finite validation loss."""
    xs, ys = [], []
    for row in run.get("history") or []:
        v, t = row.get("val_loss"), row.get("tokens")
        if _finite(v) and _finite(t):
            xs.append(float(t))
            ys.append(float(v))
    return xs, ys


def gap_curve(run: dict, ref: dict) -> tuple[list[float], list[float]]:
    """(tokens, val loss − reference val loss) at the token counts both runs evaluated at."""
    rt, rv = val_curve(ref)
    ref_at = dict(zip(rt, rv))
    xs, ys = [], []
    for t, v in zip(*val_curve(run)):
        if t in ref_at:
            xs.append(t)
            ys.append(v - ref_at[t])
    return xs, ys


# --- text ----------------------------------------------------------------------------------

def _f(x, fmt: str, none: str = "–") -> str:
    return format(x, fmt) if _finite(x) else none


def _status(r: dict) -> str:
    s = r.get("status") or "?"
    if s == "diverged" and r.get("diverged_at_step") is not None:
        s = f"diverged at step {r['diverged_at_step']}"
    if r.get("same_run_as"):  # an identical recipe under another sweep label: one run, reported twice
        s += f" (same run as {r['same_run_as']})"
    return s.replace("|", "\\|").replace("\n", " ")


def _tokens_per_s(r: dict) -> str:
    """From the timing phase (same load for every recipe: agrees with the step times); else training's, "(train)"."""
    if _finite(r.get("timed_tokens_per_s")):
        return _f(r["timed_tokens_per_s"], ",.0f")
    return _f(r.get("tokens_per_s"), ",.0f") + (" (train)" if _finite(r.get("tokens_per_s")) else "")


def format_table(results: dict) -> str:
    """Markdown table, one row per run: losses, gaps to the reference, speed, memory, wall time."""
    ref = results.get("reference")
    head = ["Recipe", "Status", "Train loss", "Val loss", f"Δ val vs {ref}", "Δ %",
            "Tokens/s", f"Step time vs {ref}", f"Tokens to {ref}'s loss ×", "Matched-loss cost",
            "Step ms (CPU ms)", "Peak mem (MiB)", "Wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for label, r in results.get("runs", {}).items():
        mem = r.get("peak_mem_bytes")
        cells = [
            f"**{label}**" if label == ref else label,
            _status(r),
            _f(r.get("final_train_loss"), ".4f"),
            _f(r.get("final_val_loss"), ".4f"),
            _f(r.get("val_gap_abs"), "+.4f"),
            _f(r.get("val_gap_pct"), "+.2f") + ("%" if _finite(r.get("val_gap_pct")) else ""),
            _tokens_per_s(r),
            _f(r.get("step_time_rel"), ".2f") + ("×" if _finite(r.get("step_time_rel")) else ""),
            report_charts.iso_cell(r, "iso_token_ratio"), report_charts.iso_cell(r, "matched_loss_cost"),
            _f(r.get("step_ms"), ".1f") + (f" ({r['cpu_ms']:.1f})" if _finite(r.get("cpu_ms")) else ""),
            _f(mem / 2**20 if _finite(mem) else None, ".1f"),
            _f(r.get("wall_time_s"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUANT_STAT_NAMES = {
    "underflow_frac": "Underflow, mean of operands",
    "underflow_frac_input": "Underflow: activations",
    "underflow_frac_weight": "Underflow: weights",
    "underflow_frac_grad_output": "Underflow: output gradients",
    "occ_clamped_frac": "OCC: activations clamped",
}


def stat_name(key: str) -> str:
    """A column title for a quantization-statistics key (the key itself when it has no name yet)."""
    return QUANT_STAT_NAMES.get(key, key)


def format_quant_table(results: dict) -> str:
    """Markdown table of the quantization statistics (union of keys over runs); "" if none reported any."""
    runs = results.get("runs", {})
    keys = sorted({k for r in runs.values() for k in (r.get("quant_stats") or {})},
                  key=lambda k: (k not in QUANT_STAT_NAMES, list(QUANT_STAT_NAMES).index(k) if k in QUANT_STAT_NAMES
                                 else 0, k))
    if not keys:
        return ""
    lines = ["| Recipe | " + " | ".join(map(stat_name, keys)) + " |", "|---|" + "---:|" * len(keys)]
    for label, r in runs.items():
        qs = r.get("quant_stats") or {}
        lines.append(f"| {label} | " + " | ".join(_f(qs.get(k), ".4g") for k in keys) + " |")
    return "\n".join(lines)


def _title(results: dict) -> str:
    cfg, model = results.get("base_config") or {}, results.get("model") or {}
    name = f"model {cfg['model']}" if "model" in cfg else None
    if name and _finite(model.get("params")):
        name += f" ({_si(model['params'])} params)"
    tokens = f"{_si(cfg['tokens'])} tokens" if _finite(cfg.get("tokens")) else None
    if tokens and _finite(model.get("tokens_per_param")):
        tokens += f" ({model['tokens_per_param']:.2g} per param)"
    parts = [name, tokens, f"seed {cfg['seed']}" if "seed" in cfg else None]
    return "lowbit compare: " + ", ".join(p for p in parts if p)


def _si(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


# --- plots ---------------------------------------------------------------------------------

def _new_figure(ncols: int, width: float = 6.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(i: int) -> dict:
    """Run i's line: colour, dash pattern and marker all change from one run to the next, so two curves that lie
    on top of each other (bf16 and fp8) stay tell-apart-able."""
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": _STYLES[i % len(_STYLES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _token_axis(ax):
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("training tokens")
    ax.grid(True, alpha=0.3)


def _plot_curves(ax, runs: dict[str, dict], reference: str | None, labels: list[str]):
    """Validation loss against tokens, one line per run; diverged/failed runs end in an ×."""
    drawn = 0
    for i, label in enumerate(labels):
        r = runs[label]
        xs, ys = val_curve(r)
        if not xs:
            continue
        kw = _style(i)
        if label == reference:
            kw = {"color": "black", "linestyle": "-", "linewidth": 2.2, "marker": "o"}
        status = r.get("status", "ok")
        name = label if status == "ok" else f"{label} ({_status(r)})"
        ax.plot(xs, ys, markersize=4, markerfacecolor="none", label=name, **kw)  # a marker at every evaluation
        if status != "ok":
            ax.plot(xs[-1:], ys[-1:], marker="x", markersize=9, color=kw["color"], linestyle="none")
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no validation losses recorded", ha="center", va="center", transform=ax.transAxes)
    _token_axis(ax)
    ax.set_ylabel("validation loss (nats/token), lower is better")
    return drawn


def plot_losses(results: dict, path: str | Path) -> Path:
    """Write `loss_figure(results)` as a PNG; returns its path."""
    path = Path(path)
    loss_figure(results).savefig(path)
    return path


def loss_figure(results: dict):
    """Two panels: validation loss vs tokens for every run, and the gap to the reference
    (val loss − reference val loss at the same token count). Returns the matplotlib Figure;
    each run is one line whose label is the run's label (tests read the lines' data)."""
    runs, ref = results.get("runs", {}), results.get("reference")
    labels = list(runs)
    fig, (ax, axg) = _new_figure(2)
    if _plot_curves(ax, runs, ref, labels):
        ax.legend(fontsize=8)
    ax.set_title("validation loss")

    drawn = 0
    if ref in runs and val_curve(runs[ref])[0]:
        axg.axhline(0.0, color="black", linewidth=1.5, label=f"{ref} (reference)")
        for i, label in enumerate(labels):
            if label == ref:
                continue
            xs, ys = gap_curve(runs[label], runs[ref])
            if xs:
                axg.plot(xs, ys, markersize=4, markerfacecolor="none", label=label, **_style(i))
                drawn += 1
    if drawn:
        axg.legend(fontsize=8)
    else:
        axg.text(0.5, 0.5, "no gap to plot (reference missing or single run)", ha="center", va="center",
                 transform=axg.transAxes)
    _token_axis(axg)
    axg.set_ylabel(f"val loss − {ref} val loss (below 0: better than {ref})")
    axg.set_title(f"gap to {ref}")
    fig.suptitle(_title(results))
    return fig


def _param_slug(param: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in param)


def sweep_plot_name(param: str) -> str:
    return f"sweep_{_param_slug(param)}.png"


def plot_sweep(results: dict, param: str, path: str | Path) -> Path:
    """Write `sweep_figure(results, param)` as a PNG; returns its path."""
    path = Path(path)
    sweep_figure(results, param).savefig(path)
    return path


def sweep_figure(results: dict, param: str):
    """Left: final validation loss against the swept value, one line per base recipe (the reference
    as a horizontal line). Right: the validation curves of the swept runs. Returns the Figure."""
    runs, ref = results.get("runs", {}), results.get("reference")
    swept = {lab: r for lab, r in runs.items() if (r.get("sweep") or {}).get("param") == param}
    values = list((results.get("sweep") or {}).get(param, []))
    for r in swept.values():  # values of runs reused from an earlier invocation, if any
        if r["sweep"]["value"] not in values:
            values.append(r["sweep"]["value"])
    numeric = all(_finite(v) for v in values)
    xpos = {repr(v): (float(v) if numeric else i) for i, v in enumerate(values)}

    fig, (ax, axc) = _new_figure(2)
    by_recipe: dict[str, list[tuple[float, float | None]]] = {}
    for r in swept.values():
        by_recipe.setdefault(r.get("recipe", "?"), []).append(
            (xpos[repr(r["sweep"]["value"])], r.get("final_val_loss") if r.get("status") == "ok" else None))
    for i, (name, pts) in enumerate(by_recipe.items()):
        pts.sort()
        ok = [(x, y) for x, y in pts if _finite(y)]
        if ok:
            ax.plot(*zip(*ok), label=name, **_style(i))
        bad = [x for x, y in pts if not _finite(y)]
        if bad:
            lo, hi = ax.get_ylim() if ok else (0, 1)
            ax.plot(bad, [hi] * len(bad), marker="x", markersize=9, linestyle="none", color=_style(i)["color"],
                    label=f"{name}: diverged/failed")
    if ref in runs and runs[ref].get("status") == "ok" and _finite(runs[ref].get("final_val_loss")):
        ax.axhline(runs[ref]["final_val_loss"], color="black", linestyle="--", linewidth=1.5, label=ref)
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"final validation loss vs {param}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    curve_labels = ([ref] if ref in runs and ref not in swept else []) + list(swept)
    if _plot_curves(axc, runs, ref, curve_labels):
        axc.legend(fontsize=8)
    axc.set_title(f"validation loss, {param} swept")
    fig.suptitle(_title(results) + f" — sweep of {param}")
    return fig


# --- the report ------------------------------------------------------------------------------

def _machine_lines(m: dict) -> list[str]:
    if not m:
        return ["(not recorded)"]
    order = ["cpu", "cpu_cores", "gpu", "device", "torch", "python", "platform", "lowbit"]
    keys = [k for k in order if k in m] + sorted(k for k in m if k not in order)
    return [f"- {k}: {m[k]}" for k in keys]


def _timing_note(timing: dict | None) -> str:
    if not timing:
        return ("Step times are those of training (no timing phase): they measure the machine's load as much as "
                "the recipe. Tokens/s: training throughput.")
    return (f"Step times come from a timing phase after training: {timing['rounds']} rounds of {timing['steps']} "
            f"steps per recipe, recipes interleaved within each round, median per recipe (wall ms, with the "
            f"process's CPU ms beside it); 1-min load average {timing['load_before']:.2f} before, "
            f"{timing['load_after']:.2f} after, on {timing['cores']} cores. Tokens/s: training throughput, under "
            "whatever load the machine had then.")


def render_markdown(results: dict, plot_name: str = LOSS_PNG, sweep_plots: dict[str, str] | None = None,
                    precision_plots: dict[str, str] | None = None) -> str:
    """The text of report.md: title, reference note, table, charts, quantization stats, command, machine."""
    cfg = results.get("base_config") or {}
    out = [f"# {_title(results)}", ""]
    ref = results.get("reference")
    if ref is not None:
        out.append(f"Reference for gaps and relative step time: `{ref}`.")
    if results.get("reference_note"):
        out.append(f"**Note:** {results['reference_note']}")
    out += [""] + [f"**Warning:** {w}." for w in (results.get("timing") or {}).get("warnings", [])]
    out += ["", format_table(results), "",
            "Δ val: final validation loss minus the reference's (lower is better); "
            "Δ %: the same relative to the reference's loss. Step time vs reference: >1 is slower. "
            "Tokens to the reference's loss: where the run's validation curve first reaches the reference's final "
            "validation loss (interpolated between evaluations), over where the reference does; matched-loss cost "
            "= step time ratio × that token ratio (the compute for the same loss). "
            + _timing_note(results.get("timing"))
            + (f" Peak mem: {results['peak_mem_note']}." if results.get("peak_mem_note") else ""), "",
            f"![validation loss and gap to {ref}]({plot_name})", ""]
    if any(_finite(r.get("iso_token_ratio")) for r in results.get("runs", {}).values()):
        out += [f"![step time, tokens to {ref}'s loss and matched-loss cost]({report_charts.ISO_PNG})", ""]
    failed = {lab: r for lab, r in results.get("runs", {}).items() if str(r.get("status", "")).startswith("failed")}
    for param, name in (sweep_plots or {}).items():
        out += [f"## Sweep of `{param}`", "", f"Values: {', '.join(map(str, results['sweep'][param]))}.", "",
                f"![sweep of {param}]({name})", ""]
    qt = format_quant_table(results)
    if qt:
        out += ["## Quantization statistics", "", "Fractions of entries, at the last logged step, mean over the "
                "quantized layers. Underflow: nonzero entries that quantized to zero.", "", qt, ""]
    if precision_plots:
        out += ["## Precision per layer", "", "Relative quantization error and underflow per layer and GeMM operand "
                "at each run's last statistics step (`lowbit inspect RUN_DIR` lists the worst).", ""]
        out += [f"![{label}]({name})" for label, name in precision_plots.items()] + [""]
    if results.get("samples"):
        out += ["## Samples", "", "Continuations from the fp32 master weights, sampled as `lowbit generate --ckpt "
                "RUN` samples (temperature 0.8, top-k 50, seed 0):", ""]
        for label, text in results["samples"].items():
            out += [f"**{label}**", "", "```", text, "```", ""]
    out += markdown_section(results.get("downstream"))
    if failed:
        out += ["## Failed runs", ""] + [f"- `{lab}`: {r['status']}" for lab, r in failed.items()] + [""]
    out += ["## Reproduce", "", "```", results.get("command") or "(command not recorded)", "```", ""]
    if cfg:
        out += ["Base configuration: " + ", ".join(f"{k}={cfg[k]!r}" for k in sorted(cfg)), ""]
    out += ["## Machine", ""] + _machine_lines(results.get("machine") or {}) + [""]
    return "\n".join(out)


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """Write loss.png, sweep_<param>.png per swept parameter and report.md into `out`; returns their paths.
    A zero-shot evaluation (`out`/eval.json, written by `lowbit eval --tasks`) becomes a section of the report."""
    out = Path(out)
    if (out / "eval.json").is_file():
        results = {**results, "downstream": json.loads((out / "eval.json").read_text())}
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": plot_losses(results, out / LOSS_PNG)}
    sweep_plots = {}
    for param in (results.get("sweep") or {}):
        name = sweep_plot_name(param)
        paths[f"sweep:{param}"] = plot_sweep(results, param, out / name)
        sweep_plots[param] = name
    precision_plots = report_charts.write_precision_plots(results, out)
    if report_charts.plot_iso_loss(results, out / report_charts.ISO_PNG):
        paths["iso"] = out / report_charts.ISO_PNG
    paths["report"] = md = out / REPORT_MD
    md.write_text(render_markdown(results, LOSS_PNG, sweep_plots, precision_plots))
    return paths

