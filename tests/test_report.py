"""lowbit.report renders a table, PNG charts and report.md from a synthetic results dict."""
import struct

import pytest

from lowbit import report
from lowbit.comparison import records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(final, tokens_per_eval=1000, n=5, start=6.0):
    """Validation rows decaying linearly from `start` to `final`, plus train-only rows between them."""
    rows = []
    for i in range(1, n + 1):
        val = start + (final - start) * i / n
        rows.append({"step": 10 * i - 5, "tokens": tokens_per_eval * i - 500, "train_loss": val + 0.1,
                     "val_loss": None})
        rows.append({"step": 10 * i, "tokens": tokens_per_eval * i, "train_loss": val + 0.05, "val_loss": val})
    return rows


def _run(final, status="ok", step=0.1, tps=5000.0, mem=50 * 2**20, recipe=None, sweep=None, **kw):
    r = {"status": status, "final_train_loss": final + 0.05, "final_val_loss": final, "step_time_s": step,
         "tokens_per_s": tps, "peak_mem_bytes": mem, "wall_time_s": 12.5, "quant_stats": {},
         "history": _history(final), "recipe": recipe, "sweep": sweep, "diverged_at_step": None}
    r.update(kw)
    return r


def _results(runs, sweep=None):
    """A results dict as lowbit.compare writes it; the gaps are filled into `runs` too, for the assertions."""
    res = records.summarize({"base_config": {"model": "tiny", "tokens": 5000, "seed": 0},
                             "command": "lowbit compare --recipes bf16,fp4-paper --model tiny", "sweep": sweep,
                             "machine": {"cpu": "TestCPU", "cpu_cores": 2, "torch": "2.x"}, "runs": runs})
    for label, r in res["runs"].items():
        runs[label].update({k: r[k] for k in ("val_gap_abs", "val_gap_pct", "step_time_rel")})
    return res


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_summarize_does_not_change_the_records_it_reads():
    runs = {"bf16": _run(4.0), "fp4-paper": _run(4.1)}
    before = repr(runs)
    res = records.summarize({"runs": runs})
    assert repr(runs) == before and res["runs"]["fp4-paper"]["val_gap_pct"] == pytest.approx(2.5)


def test_gaps_against_bf16():
    runs = {"fp32": _run(3.0, step=0.2), "bf16": _run(4.0, step=0.1), "fp4-paper": _run(4.1, step=0.3),
            "nan": _run(float("nan"), status="diverged", diverged_at_step=7)}
    res = _results(runs)
    assert res["reference"] == "bf16" and res["reference_note"] is None
    assert runs["fp4-paper"]["val_gap_abs"] == pytest.approx(0.1)
    assert runs["fp4-paper"]["val_gap_pct"] == pytest.approx(2.5)       # 0.1 / 4.0
    assert runs["fp32"]["val_gap_pct"] == pytest.approx(-25.0)
    assert runs["fp4-paper"]["step_time_rel"] == pytest.approx(3.0)
    assert runs["bf16"]["val_gap_abs"] == 0.0
    assert runs["nan"]["val_gap_abs"] is None and runs["nan"]["step_time_rel"] is None


def test_reference_falls_back_to_first_with_note():
    ref, note = records.pick_reference(["fp32", "fp4-direct"])
    assert ref == "fp32"
    assert "bf16" in note and "fp32" in note


def test_table_numbers_correspond():
    runs = {"bf16": _run(4.0, step=0.1, tps=12345.6, mem=100 * 2**20),
            "fp4-paper": _run(4.1, step=0.25, tps=4000.0),
            "fp4-direct": _run(float("nan"), status="diverged", diverged_at_step=42)}
    table = report.format_table(_results(runs))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    bf16 = next(line for line in lines if "**bf16**" in line)
    assert "4.0000" in bf16 and "12,346" in bf16 and "100.0" in bf16 and "+0.0000" in bf16
    fp4 = next(line for line in lines if "fp4-paper" in line)
    cells = [c.strip() for c in fp4.strip("|").split("|")]
    assert cells[2:8] == ["4.1500", "4.1000", "+0.1000", "+2.50%", "4,000 (train)", "2.50×"]
    div = next(line for line in lines if "fp4-direct" in line)
    assert "diverged at step 42" in div
    runs["fp4-paper[dge.k=5]"] = dict(runs["fp4-paper"], same_run_as="fp4-paper")
    assert "| ok (same run as fp4-paper) |" in report.format_table(_results(runs))


def test_writes_png_and_report(tmp_path):
    runs = {"bf16": _run(4.0), "fp8-tensor": _run(4.02), "fp4-paper": _run(4.1),
            "fp4-direct": _run(5.0, status="diverged", diverged_at_step=30,
                               quant_stats={"underflow_frac": 0.25, "occ_clamped_frac": 0.01})}
    res = _results(runs)
    paths = report.write_report(res, tmp_path)
    (w, h), nbytes = _png_size(paths["plot"])
    assert w >= 800 and h >= 300           # two panels at 110 dpi
    assert nbytes > 20_000                 # several curves, legend, labels: a blank figure is far smaller
    md = paths["report"].read_text()
    assert md.startswith("# lowbit compare: model tiny, 5k tokens, seed 0")
    assert "![validation loss" in md and "(loss.png)" in md
    assert report.format_table(res) in md
    assert "lowbit compare --recipes bf16,fp4-paper --model tiny" in md
    assert "TestCPU" in md and "cpu_cores: 2" in md
    assert "| Underflow, mean of operands | OCC: activations clamped |" in md and "0.25" in md  # named columns


def test_gap_curve_aligns_on_tokens():
    ref = {"history": [{"tokens": 100, "val_loss": 5.0}, {"tokens": 200, "val_loss": 4.0}]}
    run = {"history": [{"tokens": 100, "val_loss": 5.5}, {"tokens": 150, "val_loss": None},
                       {"tokens": 200, "val_loss": 4.25}, {"tokens": 300, "val_loss": 4.0}]}
    assert report.gap_curve(run, ref) == ([100.0, 200.0], [0.5, 0.25])


def test_sweep_chart(tmp_path):
    runs = {"bf16": _run(4.0)}
    for k, loss in ((1, 4.3), (3, 4.15), (5, 4.1), (10, 4.2)):
        runs[f"fp4-paper[dge.k={k}]"] = _run(loss, recipe="fp4-paper", sweep={"param": "dge.k", "value": k})
    runs["fp4-paper[fmt=e3m0]"] = _run(9.0, status="diverged", recipe="fp4-paper",
                                       sweep={"param": "fmt", "value": "e3m0"}, diverged_at_step=3)
    runs["fp4-paper[fmt=e2m1]"] = _run(4.1, recipe="fp4-paper", sweep={"param": "fmt", "value": "e2m1"})
    res = _results(runs, sweep={"dge.k": [1, 3, 5, 10], "fmt": ["e2m1", "e3m0"]})
    paths = report.write_report(res, tmp_path)
    for param in ("dge.k", "fmt"):
        (w, h), nbytes = _png_size(paths[f"sweep:{param}"])
        assert nbytes > 10_000
    md = paths["report"].read_text()
    assert "## Sweep of `dge.k`" in md and "(sweep_dge_k.png)" in md and "(sweep_fmt.png)" in md


def test_title_with_model_size():
    res = _results({"bf16": _run(4.0)})
    res["model"] = {"params": 1_300_000, "tokens_per_param": 5000 / 1_300_000}
    assert report._title(res) == "lowbit compare: model tiny (1.3M params), 5k tokens (0.0038 per param), seed 0"


def test_table_every_column():
    """Every column of the table against the run it describes (wall time is not step time, etc.)."""
    runs = {"bf16": _run(4.0, step=0.125, tps=8000.0, mem=64 * 2**20, wall_time_s=33.5),
            "fp8": _run(4.2, step=0.25, tps=4000.0, mem=96 * 2**20, wall_time_s=71.25)}
    res = _results(runs)
    head, _, *rows = report.format_table(res).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["Recipe", "Status", "Train loss", "Val loss", "Δ val vs bf16", "Δ %", "Tokens/s",
                    "Step time vs bf16", "Tokens to bf16's loss ×", "Matched-loss cost", "Step ms (CPU ms)",
                    "Peak mem (MiB)", "Wall (s)"]
    cells = dict(zip(cols, [c.strip() for c in rows[1].strip("|").split("|")]))
    r = runs["fp8"]
    assert cells == {"Recipe": "fp8", "Status": "ok", "Train loss": f"{r['final_train_loss']:.4f}",
                     "Val loss": "4.2000", "Δ val vs bf16": "+0.2000", "Δ %": "+5.00%", "Tokens/s": "4,000 (train)",
                     "Step time vs bf16": "2.00×", "Tokens to bf16's loss ×": "not reached", "Matched-loss cost": "not reached",
                     "Step ms (CPU ms)": "–", "Peak mem (MiB)": "96.0",
                     "Wall (s)": "71.2"}


def test_tokens_per_s_comes_from_the_timing_phase():
    """Issue 21: with a timing phase, tokens/s is tokens per step / the timed step time, so it agrees with the
    step-time ratio (training-time throughput, load noise included, stays in results.json only)."""
    runs = {"bf16": _run(4.0, tps=9000.0, tokens=4096, steps=8), "fp8": _run(4.2, tps=9500.0, tokens=4096, steps=8)}
    timing = {"per_recipe": {"bf16": {"step_s": 0.1, "cpu_s": 0.1, "rel": 1.0},
                             "fp8": {"step_s": 0.2, "cpu_s": 0.2, "rel": 2.0}}}
    res = records.summarize({"base_config": {"model": "tiny"}, "command": "c", "machine": {}, "runs": runs,
                             "timing": timing})
    head, _, *rows = report.format_table(res).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    tps = {row.split("|")[1].strip().strip("*"): row.split("|")[cols.index("Tokens/s") + 1].strip() for row in rows}
    assert tps == {"bf16": "5,120", "fp8": "2,560"}  # 512 tokens per step / 0.1 s and / 0.2 s
    assert res["runs"]["fp8"]["tokens_per_s"] == 9500.0  # training's own, kept


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_loss_figure_draws_curves_and_gaps():
    runs = {"bf16": _run(4.0), "fp4-paper": _run(4.5)}
    fig = report.loss_figure(_results(runs))
    ax, axg = fig.axes[:2]
    curves = _lines(ax)
    assert curves["bf16"] == report.val_curve(runs["bf16"])
    assert curves["fp4-paper"] == report.val_curve(runs["fp4-paper"])
    gaps = _lines(axg)
    xs, ys = gaps["fp4-paper"]
    assert (xs, ys) == report.gap_curve(runs["fp4-paper"], runs["bf16"])
    assert ys[-1] == pytest.approx(0.5)  # the last evaluation: 4.5 − 4.0


def test_sweep_figure_draws_final_loss_per_value():
    runs = {"bf16": _run(4.0)}
    for k, loss in ((1, 4.3), (3, 4.15), (5, 4.1)):
        runs[f"fp4-paper[dge.k={k}]"] = _run(loss, recipe="fp4-paper", sweep={"param": "dge.k", "value": k})
    fig = report.sweep_figure(_results(runs, sweep={"dge.k": [1, 3, 5]}), "dge.k")
    xs, ys = _lines(fig.axes[0])["fp4-paper"]
    assert xs == [1.0, 3.0, 5.0] and ys == pytest.approx([4.3, 4.15, 4.1])
    assert set(_lines(fig.axes[1])) == {"bf16", *[lab for lab in runs if lab != "bf16"]}


def test_quant_table_names_every_known_statistic():
    runs = {"bf16": _run(4.0), "fp4-paper": _run(4.1, quant_stats={k: 0.5 for k in report.QUANT_STAT_NAMES})}
    head = report.format_quant_table(_results(runs)).splitlines()[0]
    cols = [c.strip() for c in head.strip("|").split("|")][1:]
    assert cols == list(report.QUANT_STAT_NAMES.values())  # no raw key names


def test_loss_figure_tells_overlapping_curves_apart():
    """Issue 14: bf16 and fp8 curves lie on top of each other; each run gets its own colour, dash and marker, a
    marker at every evaluation point, and the axis says which way is better."""
    runs = {"bf16": _run(4.0), "fp8-tensor": _run(4.0), "fp8-block": _run(4.0), "fp4-direct": _run(4.3),
            "fp4-paper": _run(4.1)}
    ax, axg = report.loss_figure(_results(runs)).axes[:2]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    looks = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(looks) == len(lines) == 5
    assert all(ln.get_marker() not in (None, "None", "") for ln in lines)
    assert "lower is better" in ax.get_ylabel()


def test_timing_phase_ratios_replace_training_ratios_in_the_table():
    runs = {"bf16": _run(4.0, step=0.1), "fp4-paper": _run(4.1, step=0.9)}  # training: 9x (a busy machine)
    res = {"base_config": {}, "runs": runs, "timing": {
        "rounds": 3, "steps": 2, "reference": "bf16", "load_before": 0.5, "load_after": 3.5, "cores": 2,
        "per_recipe": {"bf16": {"step_s": 0.1, "cpu_s": 0.19, "rel": 1.0, "spread": 1.0},
                       "fp4-paper": {"step_s": 0.15, "cpu_s": 0.28, "rel": 1.5, "spread": 1.05}},
        "warnings": ["the machine was busy"]}}
    summary = records.summarize(res)
    row = [c.strip() for c in report.format_table(summary).splitlines()[3].strip("|").split("|")]
    assert row[0] == "fp4-paper" and row[7] == "1.50×" and row[10] == "150.0 (280.0)"  # after the two iso-loss columns
    md = report.render_markdown(summary)
    assert "**Warning:** the machine was busy." in md and "timing phase after training: 3 rounds of 2" in md
