"""lowbit ladder: parameter counts as the reference tables count them, planning, the epoch limit, sharding, resume
from kept summaries, the paired gaps and their interval, the verdict rules, the plot's data, and the scaling fit.
The trainer is test_compare's FakeTrainer (deterministic losses per recipe and seed)."""
from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.comparison import ladder as lad
from lowbit.comparison import ladder_report as rep
from lowbit.comparison import references, scaling
from lowbit.models import build_model
from test_compare import fake  # noqa: F401  (fixture: a stand-in trainer)

# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", ["llama-nano", "llama-micro", "llama-mini", "tiny", "llama-tiny"])
def test_reference_count_is_quest_count_on_the_built_model(name):
    # QuEST's main.py: non-embedding = all parameters - lm_head.weight - the token embedding's weight.
    # Catches: subtracting the embedding once for an untied head, or dropping a GPT's position embedding.
    with torch.device("meta"):
        m = build_model(name)
    emb = m.tok_embeddings if hasattr(m, "tok_embeddings") else m.transformer.wte
    want = sum(p.numel() for p in m.parameters()) - m.lm_head.weight.numel() - emb.weight.numel()
    got = lad.param_counts(name, 2048)
    assert got == {"total": sum(p.numel() for p in m.parameters()), "reference": want}


def test_llama_micro_reference_count_by_hand():
    # 2 layers x (2 RMSNorms 2*64 + attention 4*64^2 + SwiGLU 3*64*192) + final RMSNorm 64 = 106,816
    assert lad.param_counts("llama-micro", 2048)["reference"] == 2 * (2 * 64 + 4 * 64 ** 2 + 3 * 64 * 192) + 64


def test_tied_head_is_subtracted_once():
    from lowbit.flops import count_params
    from lowbit.models import PRESETS, get_config

    PRESETS["_tied"] = get_config("llama-nano", tie_embeddings=True)
    try:
        n = lad.param_counts("_tied", 2048)
        assert n["reference"] == count_params(get_config("_tied"))["total"] - 2048 * 64
    finally:
        del PRESETS["_tied"]


# ---------------------------------------------------------------- planning, epochs, shards


def test_plan_tokens_seeds_and_order():
    cells = lad.plan_ladder(["llama-nano", "llama-micro"], [100, 25], [1, 2, 3], seeds_at=[25], tokens_per_step=4096)
    assert [c.key for c in cells] == [
        "llama-nano/dn25/seed1", "llama-micro/dn25/seed1", "llama-nano/dn25/seed2", "llama-micro/dn25/seed2",
        "llama-nano/dn25/seed3", "llama-micro/dn25/seed3", "llama-nano/dn100/seed1", "llama-micro/dn100/seed1"]
    c = cells[1]
    assert c.tokens % 4096 == 0 and abs(c.tokens - 25 * 106_816) <= 2048  # whole steps, nearest
    assert c.d_over_n() == {"reference": c.tokens / 106_816, "total": c.tokens / 368_960}
    total = lad.plan_ladder(["llama-micro"], [25], [1], tokens_per_step=4096, count="total")[0]
    assert abs(total.tokens - 25 * 368_960) <= 2048


def test_plan_errors():
    with pytest.raises(ValueError, match="--count"):
        lad.plan_ladder(["llama-nano"], [25], [1], tokens_per_step=1, count="nonembedding")
    with pytest.raises(ValueError, match="positive"):
        lad.plan_ladder(["llama-nano"], [0], [1], tokens_per_step=1)
    with pytest.raises(ValueError, match="at least one model"):
        lad.plan_ladder([], [25], [1], tokens_per_step=1)


def test_epoch_limit():
    cells = lad.plan_ladder(["llama-nano"], [25], [1], tokens_per_step=4096)
    d = cells[0].tokens
    assert lad.check_passes(cells, d) == []  # exactly one pass: no warning
    assert "1.60 passes" in lad.check_passes(cells, round(d / 1.6))[0]
    assert lad.check_passes(cells, d // 4) != []  # exactly 4 passes: allowed, warned
    with pytest.raises(ValueError, match=r"4\.1 passes .*Fix: lower --dn"):
        lad.check_passes(cells, round(d / 4.1))


def test_shards_partition_and_balance():
    cells = lad.plan_ladder(["llama-nano", "llama-micro"], [25, 100], [1, 2, 3], seeds_at=[25], tokens_per_step=4096)
    parts = [lad.shard(cells, k, 2) for k in range(2)]
    assert sorted(c.key for p in parts for c in p) == sorted(c.key for c in cells)
    loads = [sum(c.tokens for c in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(c.tokens for c in cells)
    assert all([c for c in cells if c in p] == p for p in parts)  # run order kept
    with pytest.raises(ValueError, match="--shard"):
        lad.shard(cells, 2, 2)


# ---------------------------------------------------------------- running and resuming


def _run(fake, tmp_path, out, keep, seeds=(1, 2)):  # noqa: F811
    trainer, Cfg, _ = fake
    trainer.loss_fn = lambda name, seed: {"bf16": 3.0, "nvfp4": 3.06, "fp8-tensor": 3.003}[name] + 0.01 * seed
    cells = lad.plan_ladder(["llama-nano"], [1, 2], list(seeds), tokens_per_step=1000)
    return cells, lad.run_ladder(["bf16", "fp8-tensor", "nvfp4"], cells, Cfg(batch_size=1, seq_len=1000), out, keep,
                                 progress=False)


def test_run_keeps_summaries_and_resumes_from_them_alone(fake, tmp_path):  # noqa: F811
    trainer = fake[0]
    cells, agg = _run(fake, tmp_path, tmp_path / "out", tmp_path / "keep")
    assert len(trainer.calls) == 4 * 3
    kept = sorted(p.relative_to(tmp_path / "keep").as_posix() for p in (tmp_path / "keep").rglob("*.result.json"))
    assert kept == sorted(f"{c.key}/{r}.result.json" for c in cells for r in ("bf16", "fp8-tensor", "nvfp4"))
    shutil.rmtree(tmp_path / "out")  # lose every run directory: the kept summaries alone resume the ladder
    trainer.calls.clear()
    _, again = _run(fake, tmp_path, tmp_path / "out", tmp_path / "keep")
    assert trainer.calls == [] and again["rows"] == agg["rows"]
    (tmp_path / "keep" / cells[0].key / "nvfp4.result.json").unlink()  # one summary missing: only it reruns
    shutil.rmtree(tmp_path / "out")
    _run(fake, tmp_path, tmp_path / "out", tmp_path / "keep")
    assert [(c.recipe, c.seed, c.tokens) for c in trainer.calls] == [("nvfp4", 1, cells[0].tokens)]


def test_paired_gap_and_interval(fake, tmp_path):  # noqa: F811
    _, agg = _run(fake, tmp_path, tmp_path / "out", tmp_path / "keep", seeds=(1, 2, 3))
    row = next(r for r in agg["rows"] if r["recipe"] == "nvfp4" and r["dn"] == 1)
    gaps = [100 * ((3.06 + 0.01 * s) / (3.0 + 0.01 * s) - 1) for s in (1, 2, 3)]
    mean = sum(gaps) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 2)
    assert row["seeds"] == 3 and row["gap_pct"] == pytest.approx(mean)
    assert row["gap_pct_ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)])
    assert row["val_loss_mean"] == pytest.approx(3.08)


# ---------------------------------------------------------------- verdicts, plot data, report


def _row(recipe, dn, gap, ci=None, sd=None, model="m"):
    return {"recipe": recipe, "model": model, "dn": dn, "gap_pct": gap, "gap_pct_ci95": ci, "gap_pct_sd": sd,
            "d_over_n": {"reference": dn, "total": dn / 3}, "n_reference": 10, "n_total": 30, "tokens": 10 * dn,
            "seeds": 3 if ci else 1, "val_loss_mean": 3.0}


GOOD = [_row("bf16", 25, 0.0), _row("bf16", 100, 0.0),
        _row("fp8-tensor", 25, 0.1, [-0.1, 0.3], 0.1), _row("fp8-tensor", 100, 0.2),
        _row("fp4-direct", 25, 2.5, [2.0, 3.0], 0.1), _row("fp4-direct", 100, 3.4),
        _row("fp4-paper", 25, 1.5, [1.2, 1.8], 0.1), _row("fp4-paper", 100, 1.9),
        _row("nvfp4", 25, 1.8, [1.5, 2.1], 0.1), _row("nvfp4", 100, 3.0),
        _row("quartet", 25, 1.2, [1.0, 1.4], 0.1), _row("quartet", 100, 2.5)]


def test_verdicts_hold_on_the_published_picture():
    v = rep.verdicts(GOOD)
    assert {k: x["status"] for k, x in v.items()} == dict.fromkeys("abcdef", "holds")
    assert "fp4-paper m D/N=25: +1.50% [+1.20, +1.80]" in v["f"]["evidence"]


@pytest.mark.parametrize("change, verdict, status", [
    (("quartet", 25, -0.5, [-0.8, -0.2]), "a", "does not hold"),       # an FP4 recipe below bf16
    (("quartet", 25, 0.05, [-0.1, 0.2]), "a", "not resolved at this scale"),  # interval straddles 0
    (("nvfp4", 100, 1.0, None), "b", "does not hold"),                 # the gap shrinks with D/N
    (("nvfp4", 25, 0.7, [0.5, 0.9]), "c", "does not hold"),            # nvfp4 below quartet
    (("fp8-tensor", 100, 0.7, None), "d", "does not hold"),            # fp8 outside 0.5%
    (("fp4-paper", 25, 2.8, [2.6, 3.0]), "e", "does not hold"),        # fp4-paper above fp4-direct
    (("fp4-paper", 100, 2.3, None), "f", "does not hold"),             # fp4-paper beyond 2%
])
def test_each_verdict_can_fail(change, verdict, status):
    rows = [r for r in GOOD if (r["recipe"], r["dn"]) != change[:2]]
    rows.append(_row(*change[:3], change[3], 0.1 if change[3] else None))
    assert rep.verdicts(rows)[verdict]["status"] == status


def test_single_seed_gap_inside_the_seed_noise_is_unresolved():
    rows = [_row("nvfp4", 25, 0.15, None), _row("x", 25, 0.0, [-0.1, 0.1], 0.1)]
    assert rep.sign(rows[0], rep.noise(rows)) == 0  # 0.15 < 2 x 0.1
    assert rep.sign(_row("nvfp4", 25, 0.25), 0.1) == 1


def test_plot_series_is_the_rows_and_the_reference_table():
    s = rep.plot_series(GOOD, "total")
    assert ("bf16", "m") not in s["lowbit"]
    assert s["lowbit"][("nvfp4", "m")] == [(25 / 3, 1.8, 1.5, 2.1), (100 / 3, 3.0, 3.0, 3.0)]
    q2 = references.quartet2_points()
    assert sorted(s["reference"]) == ["nvidia", "quartetv2", "tetrajetv2"]
    assert sum(map(len, s["reference"].values())) == len(q2)


def test_write_report_files(tmp_path):
    cells = [{"key": "m/dn25/seed1", "model": "m", "dn": 25, "seed": 1, "tokens": 250, "val_loss": {"bf16": 3.0}}]
    report = rep.write_report({"rows": GOOD, "cells": cells}, tmp_path, {"command": "lowbit ladder x", "count": "reference"})
    assert json.loads((tmp_path / "ladder.json").read_text())["verdicts"]["a"]["status"] == "holds"
    md = (tmp_path / "ladder.md").read_text()
    assert "| m | 10 | 30 | 1,000 | 100.0 | 33.3 | nvfp4 | 1 | 3.0000 | +3.00% |  |" in md
    assert "(b) the FP4 gap grows with D/N: **holds**" in md
    assert report["fit"]["status"].startswith("not fitted") and (tmp_path / "ladder.png").is_file()


# ---------------------------------------------------------------- reference data and the scaling fit


def test_quartet2_table_matches_the_published_gaps():
    # the reading of Quartet II's runs.json at 30M: NVFP4 +1.6% -> +3.4%, TetraJet-v2 +1.6% -> +2.9%,
    # Quartet II +1.3% -> +2.8% from D/N ~ 25 to the largest D/N
    for scheme, lo, hi in (("nvidia", 1.6, 3.4), ("tetrajetv2", 1.6, 2.9), ("quartetv2", 1.3, 2.8)):
        pts = sorted((p["D_over_N"], p["gap_pct"]) for p in references.quartet2_points(scheme) if p["size"] == "30M")
        assert pts[0][1] == pytest.approx(lo, abs=0.05) and pts[-1][1] == pytest.approx(hi, abs=0.1)
    for p in references.quartet2_points():
        assert p["gap_pct"] == pytest.approx(100 * (p["loss"] / p["bf16_loss"] - 1), abs=2e-3)
        assert p["D_over_N"] == pytest.approx(p["D"] / p["N"], rel=1e-3)
    assert references.load("quartet2")["source"]["commit"] == "e2eda479ffb6d04b00426b32030418696e3f0637"


def test_quest_fit_reproduces_a_bf16_run():
    fit = references.quest_fit()
    assert fit["eff"]["fp4"] == pytest.approx(0.63, abs=0.005) and fit["eff"]["int8"] == pytest.approx(1.0, abs=0.02)
    # QuEST's 50M bf16 run at D = 5.0B tokens (runs_for_scaling.json): loss 3.0678
    assert references.scaling_loss(fit, 49_556_736, 4_999_872_512) == pytest.approx(3.0678, rel=0.005)


def test_scaling_fit_recovers_a_known_efficiency():
    law = {"A": 20.0, "alpha": 0.3, "B": 40.0, "beta": 0.3, "E": 1.5}
    pts = {r: [(n, d, references.scaling_loss(law, n, d, eff)) for n in (5e4, 1e5, 2e5) for d in (1e6, 4e6)]
           for r, eff in (("bf16", 1.0), ("fp4", 0.6))}
    got = scaling.fit(pts)
    assert got["status"] == "fitted" and got["eff"]["fp4"] == pytest.approx(0.6, rel=0.03)
    assert scaling.fit({"bf16": pts["bf16"][:2]})["status"].startswith("not fitted")
    one_line = [(n, 25 * n, references.scaling_loss(law, n, 25 * n)) for n in (5e4, 1e5, 2e5, 4e5)]
    assert "1 D/N value" in scaling.fit({"bf16": one_line})["status"]  # N and D confounded on one D/N line


def test_cli_errors_before_any_work(capsys):
    from lowbit.cli import main

    assert main(["ladder", "--recipes", "fp8-tensor,nvfp4"]) != 0
    assert "--recipes must include bf16" in capsys.readouterr().err
    assert main(["ladder", "--shard", "1of2"]) != 0
    assert "give K/N" in capsys.readouterr().err


def test_a_stop_mid_cell_keeps_the_runs_that_finished(fake, tmp_path, monkeypatch):  # noqa: F811
    trainer = fake[0]

    def stop_at_nvfp4(cfg, progress=True, dataset=None):
        if "nvfp4" in cfg.recipe:
            raise KeyboardInterrupt  # the session is stopped while nvfp4 trains
        return trainer(cfg, progress, dataset)

    monkeypatch.setattr(importlib.import_module("lowbit.train"), "train", stop_at_nvfp4)
    with pytest.raises(KeyboardInterrupt):
        _run(fake, tmp_path, tmp_path / "out", tmp_path / "keep")
    kept = sorted(p.name for p in (tmp_path / "keep").rglob("*.result.json"))
    assert kept == ["bf16.result.json", "fp8-tensor.result.json"]  # lost: only the run in progress


def test_report_only_is_built_from_what_the_kept_summaries_hold(tmp_path, capsys):
    """Issue 21: `--report-only` with default flags (--seeds 1) used seed 1 only although bench/ladder keeps seeds
    1-3; now every kept cell is reported, each with the tokens its runs trained."""
    from lowbit.cli import main

    keep = Path(__file__).resolve().parents[1] / "bench" / "ladder"
    kept = {p.parent.relative_to(keep).as_posix() for p in keep.rglob("bf16.result.json")}
    assert main(["ladder", "--report-only", "--keep", str(keep), "--out", str(tmp_path / "lad")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "lad" / "ladder.json").read_text())
    assert {c["key"] for c in doc["cells"]} == kept and {c["seed"] for c in doc["cells"]} == {1, 2, 3}
    for c in doc["cells"]:
        assert c["tokens"] == json.loads((keep / c["key"] / "bf16.result.json").read_text())["tokens"]
    assert main(["ladder", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "no finished ladder runs" in capsys.readouterr().err
