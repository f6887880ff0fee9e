"""Per-layer, per-GeMM quantization statistics (lowbit.nn.stats, lowbit.train.qstats) against hand-computed
values, `lowbit inspect`'s heatmap data against the records, and statistics off costing nothing."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lowbit.nn.function as fn_mod
from lowbit import precision
from lowbit import recipes as R
from lowbit.cli import main as cli_main
from lowbit.nn import QLinear, collect_stats
from lowbit.nn.stats import operand_stats
from lowbit.quant import absmax_scale
from lowbit.tensor_quant import TensorQuant
from lowbit.train import TrainConfig, train
from lowbit.nn.convert import layer_records
from lowbit.train.qstats import read

CORPUS = "kings"  # conftest's corpus fixture writes this one


def test_operand_stats_hand_computed():
    """Row [6, 0.2, 0.3, -0.1] under E2M1 per row: scale 1; 0.2 and -0.1 round to 0 (below the 0.25 midpoint),
    0.3 to 0.5: underflow 2 of the 4 nonzero entries; error ‖(0, -0.2, 0.2, 0.1)‖ / ‖x‖."""
    x = torch.tensor([[6.0, 0.2, 0.3, -0.1], [0.0, 0.0, 0.0, 0.0]])
    q = TensorQuant("e2m1", "row")
    tq = torch.tensor([[6.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = absmax_scale(x, q)
    st = {k: float(v) for k, v in operand_stats(x, tq, q, x / s, s).items()}
    assert st["underflow"] == pytest.approx(2 / 4)
    assert st["saturated"] == 0
    err = math.sqrt(0.2 ** 2 + 0.2 ** 2 + 0.1 ** 2) / math.sqrt(36 + 0.04 + 0.09 + 0.01)
    assert st["rel_err"] == pytest.approx(err, rel=1e-6)
    assert st["sqnr_db"] == pytest.approx(-20 * math.log10(err), rel=1e-6)
    assert st["scale_log2_min"] == 0 and st["scale_log2_max"] == 0  # scale 1 (all-zero row: scale 1 too)


def test_saturated_fraction_under_delayed_scaling():
    """A delayed amax of 1 with E4M3: entries beyond 1 (scaled beyond 448) clip; here 3 of 8."""
    lin = nn.Linear(8, 4, bias=False)
    q = QLinear.from_linear(lin, R.get("fp8-tensor-delayed").replace(compute_dtype="fp32"))
    collect_stats(q, True)
    q.qstate.amax_history_input.fill_(1.0)  # the history says |x| <= 1
    x = torch.tensor([[0.5, -0.25, 2.0, -3.0, 0.1, 4.0, 0.0, 1.0]])
    q(x)
    recs = {(r["gemm"], r["operand"]): r for r in layer_records(nn.Sequential(q))}
    assert recs[("fprop", "input")]["saturated"] == pytest.approx(3 / 8)
    assert recs[("fprop", "input")]["scale_log2_mean"] == pytest.approx(math.log2(1 / 448), rel=1e-6)


def test_every_gemm_operand_is_recorded_once():
    """fp4-direct requantizes every operand for every GeMM (row scales); fp8-tensor reuses per-tensor copies."""
    torch.manual_seed(0)
    for name, want in (("fp4-direct", {("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output"),
                                       ("dgrad", "weight"), ("wgrad", "grad_output"), ("wgrad", "input")}),
                       ("fp8-tensor", {("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output")})):
        m = nn.Sequential(QLinear(32, 16, recipe=R.get(name).replace(compute_dtype="fp32")))
        collect_stats(m, True)
        x = torch.randn(8, 32, requires_grad=True)
        m(x).sum().backward()
        recs = layer_records(m)
        assert {(r["gemm"], r["operand"]) for r in recs} == want, name
        assert all(r["layer"] == "0" for r in recs)
        assert layer_records(m) == []  # popped


def test_statistics_off_costs_nothing(monkeypatch):
    """Off, a step runs exactly the quantizations of the recipe and no statistics pass."""
    calls = {"fq": 0, "stats": 0}
    real_fq, real_rec = fn_mod.fake_quantize_2d, fn_mod.record_operand
    monkeypatch.setattr(fn_mod, "fake_quantize_2d", lambda *a, **k: calls.__setitem__("fq", calls["fq"] + 1)
                        or real_fq(*a, **k))
    monkeypatch.setattr(fn_mod, "record_operand", lambda *a, **k: calls.__setitem__("stats", calls["stats"] + 1)
                        or real_rec(*a, **k))
    m = QLinear(32, 16, recipe=R.get("fp4-direct").replace(compute_dtype="fp32"))
    x = torch.randn(8, 32, requires_grad=True)
    m(x).sum().backward()
    assert calls == {"fq": 6, "stats": 0}  # X, W; dY, W along N; dYᵀ, Xᵀ along M
    collect_stats(m, True)
    m(x).sum().backward()
    assert calls == {"fq": 12, "stats": 6}


def cfg(corpus, out, **kw):
    base = dict(model="tiny", data=str(corpus), tokenizer="bytes", tokens=8 * 4 * 32, batch_size=4, seq_len=32,
                device="cpu", eval_interval=4, eval_batches=2, log_interval=2, ckpt_interval=4, out=str(out),
                recipe="fp4-paper")
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_writes_records_at_the_interval_and_resume_drops_later_ones(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "a", stats_interval=3), progress=False)
    recs = read(tmp_path / "a")
    assert sorted({r["step"] for r in recs}) == [3, 6, 8]  # every 3 steps and the last
    assert {r["layer"] for r in recs} == {f"transformer.h.{i}.{m}" for i in range(4)
                                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(0 <= r["occ_clamped"] <= 1 for r in recs if r["operand"] == "input" and r["gemm"] == "fprop")
    # an interrupted run resumed from step 4 keeps the records up to 4 and rewrites the rest
    path = tmp_path / "a" / "quant_stats.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps({**json.loads(lines[0]), "step": 99})]) + "\n")
    train(cfg(corpus, tmp_path / "a", stats_interval=3, tokens=10 * 4 * 32, resume=True), progress=False)
    steps = sorted({r["step"] for r in read(tmp_path / "a")})
    assert 99 not in steps and steps[-1] == 10


def test_stats_interval_zero_writes_nothing(corpus, tmp_path):
    res = train(cfg(corpus, tmp_path / "b", stats_interval=0), progress=False)
    assert read(tmp_path / "b") == [] and not res.quant_stats
    with pytest.raises(ValueError, match="stats_interval must be >= 0"):
        cfg(corpus, tmp_path / "c", stats_interval=-1)


def test_heatmap_data_is_the_records():
    recs = [{"step": 5, "layer": "a", "gemm": "fprop", "operand": "input", "rel_err": 0.1, "underflow": 0.2},
            {"step": 5, "layer": "a", "gemm": "dgrad", "operand": "grad_output", "rel_err": 0.3, "underflow": 0.0},
            {"step": 5, "layer": "b", "gemm": "fprop", "operand": "input", "rel_err": 0.5, "underflow": 0.1},
            {"step": 2, "layer": "b", "gemm": "fprop", "operand": "input", "rel_err": 0.9, "underflow": 0.9}]
    layers, cols, a = precision.precision_matrix(recs, "rel_err")
    assert layers == ["a", "b"] and cols == [("fprop", "input"), ("dgrad", "grad_output")]
    assert a[0].tolist() == [0.1, 0.3] and a[1, 0] == 0.5 and math.isnan(a[1, 1])
    layers, steps, t = precision.over_time(recs, "rel_err")
    assert steps == [2, 5] and t[layers.index("a")][1] == pytest.approx(0.2) and math.isnan(t[layers.index("a")][0])
    assert [r["layer"] for r in precision.worst(recs, "rel_err", n=2)] == ["b", "a"]
    fig = precision.figure(recs)
    assert fig.axes[0].images[0].get_array().tolist()[0] == [0.1, 0.3]  # the array drawn is the matrix


def test_heatmaps_of_one_comparison_share_a_colour_scale():
    """Issue 21: each recipe's heatmap had its own scale, so colours did not compare across recipes."""
    a = [{"step": 5, "layer": "l0", "gemm": "fprop", "operand": "input", "rel_err": 0.1, "underflow": 0.02}]
    b = [{"step": 7, "layer": "l0", "gemm": "fprop", "operand": "input", "rel_err": 0.4, "underflow": 0.01},
         {"step": 3, "layer": "l0", "gemm": "fprop", "operand": "input", "rel_err": 0.9, "underflow": 0.5}]  # old step
    limits = precision.shared_limits({"fp8": a, "fp4": b, "bf16": []})
    assert limits == {"rel_err": (0.0, 0.4), "underflow": (0.0, 0.02)}
    for recs in (a, b):
        fig = precision.figure(recs, limits=limits)
        assert [ax.images[0].get_clim() for ax in fig.axes if ax.images] == [(0.0, 0.4), (0.0, 0.02)]


def test_inspect_cli(corpus, tmp_path, capsys):
    train(cfg(corpus, tmp_path / "r"), progress=False)
    assert cli_main(["inspect", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "worst by relative error" in out and "transformer.h." in out
    assert (tmp_path / "r" / "precision.png").stat().st_size > 0
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2  # issue 21: says what is wrong
    assert "nothing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["inspect", str(tmp_path / "empty")]) == 2
    assert "has no quant_stats.jsonl" in capsys.readouterr().err
