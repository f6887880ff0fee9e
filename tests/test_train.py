"""Tests for lowbit.train: config/TOML, LR schedule, checkpoints (atomic, checksummed, fallback), exact resume,
non-finite step handling, and that training actually learns (loss well below the unigram entropy).

Everything runs on a local, generated corpus with the bytes tokenizer (no network) and a private cache."""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fp32_compute, trainer_with_batch_hook
from lowbit import kernels
from lowbit.data import prepare_dataset
from lowbit.train import TrainConfig, Trainer, evaluate, load_checkpoint, lr_at, parse_count, train
from lowbit.train import checkpoint as ckpt_mod
from lowbit.train import weights as weights_mod

CORPUS = "grammar"  # conftest's corpus fixture writes this one


def tiny_cfg(corpus, out, **kw) -> TrainConfig:
    # 8 steps of 2x(4x32) tokens (grad_accum 2): small enough for a couple of seconds on CPU
    base = dict(model="tiny", data=str(corpus), tokenizer="bytes", tokens=8 * 2 * 4 * 32, batch_size=4, seq_len=32,
                grad_accum=2, lr=2e-3, seed=0, device="cpu", eval_interval=4, eval_batches=2, log_interval=2,
                ckpt_interval=3, keep_last=2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    found = ckpt_mod.list_checkpoints(run_dir / "ckpt")
    d = found[0][1] if step is None else run_dir / "ckpt" / ckpt_mod.step_dir_name(step)
    return load_file(d / ckpt_mod.MODEL_FILE)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, not allclose


# --- config ---------------------------------------------------------------------------------------------

def test_parse_count():
    cases = {"2000000": 2_000_000, "2M": 2_000_000, "1.5M": 1_500_000, "500k": 500_000, "1.5B": 1_500_000_000,
             "2e6": 2_000_000, "2_000": 2000, 7: 7, 3.0: 3, " 4K ": 4000}
    assert {k: parse_count(k) for k in cases} == cases
    for bad in ("1.5", "lots", "-1M", "1.0000001k", True, None, 2.5):
        with pytest.raises(ValueError, match="bad count"):
            parse_count(bad)


def test_config_defaults_match_contract():
    c = TrainConfig()
    assert (c.model, c.recipe, c.data, c.tokenizer, c.vocab_size, c.tokens, c.batch_size, c.seq_len) == \
           ("tiny", "fp32", None, "bpe", 2048, 2_000_000, 16, 128)
    assert (c.grad_accum, c.lr, c.min_lr_ratio, c.warmup_steps, c.weight_decay, c.beta1, c.beta2, c.grad_clip) == \
           (1, 1e-3, 0.1, None, 0.1, 0.9, 0.95, 1.0)
    assert (c.seed, c.device, c.eval_interval, c.eval_batches, c.log_interval, c.ckpt_interval, c.keep_last) == \
           (0, "auto", 100, 10, 10, 200, 2)
    assert (c.out, c.resume, c.overwrite, c.compile, c.max_bad_steps) == ("runs/default", False, False, False, 5)
    assert TrainConfig(tokens="1.5M").tokens == 1_500_000


@pytest.mark.parametrize("kw, match", [
    (dict(tokens=0), "tokens must be > 0"),
    (dict(tokens="2 million"), "bad count"),
    (dict(batch_size=0), "batch_size must be > 0"),
    (dict(seq_len=-1), "seq_len must be > 0"),
    (dict(grad_accum=0), "grad_accum must be > 0"),
    (dict(lr=0.0), "lr must be a positive"),
    (dict(lr=float("nan")), "lr must be a positive"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(beta2=1.0), r"beta2 must be in \[0, 1\)"),
    (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(resume="yes"), "resume must be true or false"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(model="huge"), "unknown model preset 'huge'"),
    (dict(recipe="fp3"), "unknown recipe 'fp3'"),
    (dict(resume=True, overwrite=True), "contradict"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_toml_load_override_and_errors(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('model = "small"\nrecipe = "fp4-paper"\ntokens = "500k"\nlr = 3e-4\nbatch_size = 8\n')
    c = TrainConfig.from_toml(p, batch_size=32)  # the override (command line) wins over the file
    assert (c.model, c.recipe, c.tokens, c.lr, c.batch_size, c.seq_len) == ("small", "fp4-paper", 500_000, 3e-4, 32, 128)
    # round trip through to_toml
    q = tmp_path / "back.toml"
    q.write_text(c.to_toml())
    assert TrainConfig.from_toml(q) == c

    p.write_text('model = "tiny"\nlearning_rate = 1e-3\nbatchsize = 4\n')
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys 'learning_rate', 'batchsize'; valid keys: model"):
        TrainConfig.from_toml(p)
    with pytest.raises(ValueError, match="unknown TrainConfig key 'nope'"):
        TrainConfig.from_toml(q, nope=1)
    p.write_text("lr = \n")
    with pytest.raises(ValueError, match="invalid TOML"):
        TrainConfig.from_toml(p)
    p.write_text("[train]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match="tables"):
        TrainConfig.from_toml(p)
    p.write_text("lr = -1.0\n")
    with pytest.raises(ValueError, match=f"config file {p}: lr must be"):
        TrainConfig.from_toml(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


# --- schedule -------------------------------------------------------------------------------------------

def test_lr_schedule_closed_form():
    lr, steps, w, r = 1e-3, 111, 10, 0.1
    got = [lr_at(s, steps, lr, w, r) for s in range(steps)]
    # warmup: linear from lr/W to lr
    for s in range(w):
        assert got[s] == pytest.approx(lr * (s + 1) / w, rel=1e-12)
    # decay: cosine from lr (first decay step) to exactly min at the last step; halfway = mean of the two
    assert got[w] == pytest.approx(lr, rel=1e-12)
    assert got[-1] == pytest.approx(r * lr, rel=1e-12)
    span = steps - w - 1
    for s in (w + 1, w + span // 4, w + span // 2, steps - 2):
        p = (s - w) / span
        assert got[s] == pytest.approx(r * lr + (lr - r * lr) * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)
    assert got[w + span // 2] == pytest.approx((lr + r * lr) / 2, rel=1e-12)  # span is even: exactly halfway
    assert all(a >= b for a, b in zip(got[w:], got[w + 1:]))                     # monotone decay
    assert lr_at(0, 1, lr, 0, r) == lr                                          # single step: peak lr
    assert lr_at(5, 10, lr, 0, 0.0) > 0 and lr_at(9, 10, lr, 0, 0.0) == 0.0


def test_train_uses_schedule_and_default_warmup(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "run", tokens=40 * 32, batch_size=1, grad_accum=1, log_interval=1,
                   eval_interval=100, ckpt_interval=100)
    res = train(cfg, progress=False)
    assert res.steps == 40 and [r["step"] for r in res.history] == list(range(1, 41))
    w = int(0.05 * 40)  # default warmup: 5% of the steps
    assert w == 2 and res.history[0]["lr"] == cfg.lr / 2
    for row in res.history:
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, 40, cfg.lr, w, cfg.min_lr_ratio), rel=1e-12)


# --- the run directory, metrics, result ----------------------------------------------------------------

def test_run_dir_layout_metrics_and_result(corpus, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_cfg(corpus, out), progress=False)
    assert res.steps == 8 and res.tokens == 8 * 2 * 4 * 32 and res.diverged_at_step is None
    for name in ("config.toml", "metrics.jsonl", "metrics.csv", "result.json", "tokenizer/lowbit_tokenizer.json"):
        assert (out / name).is_file(), name
    assert TrainConfig.from_toml(out / "config.toml") == tiny_cfg(corpus, out)
    # checkpoints every 3 steps, keep the last 2: step 6 and the final step 8
    assert [s for s, _ in ckpt_mod.list_checkpoints(out / "ckpt")] == [8, 6]
    meta = json.loads((out / "ckpt/step_0000008/meta.json").read_text())
    assert meta["step"] == 8 and meta["vocab_size"] == 257 and meta["config"]["model"] == "tiny"
    assert meta["files"][ckpt_mod.MODEL_FILE] == ckpt_mod.sha256_file(out / "ckpt/step_0000008/model.safetensors")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and rows == json.loads(json.dumps(res.history))
    assert [r["val_loss"] is not None for r in rows] == [False, True, False, True]  # eval every 4 steps
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,tokens,train_loss,val_loss,lr,grad_norm,tokens_per_s,mfu") and len(csv_lines) == 5
    saved = json.loads((out / "result.json").read_text())
    assert saved["final_val_loss"] == res.final_val_loss == rows[-1]["val_loss"]
    assert saved["quant_kernels"] == kernels.which()  # which quantizers ran: the compiled ones or eager
    assert res.tokens_per_s > 0 and res.step_time_s > 0 and res.peak_mem_bytes > 0 and res.wall_time_s > 0
    assert res.mfu is not None and 0 < res.mfu < 1
    assert rows[0]["train_loss"] > rows[-1]["train_loss"]  # it learns even in 8 steps


def test_refuses_non_empty_out_unless_resume_or_overwrite(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already exists and is not empty; pass --resume .* --overwrite"):
        train(tiny_cfg(corpus, out), progress=False)
    a = train(tiny_cfg(corpus, out, tokens=2 * 2 * 4 * 32, overwrite=True), progress=False)
    assert a.steps == 2 and (out / "notes.txt").read_text() == "mine"  # overwrite deletes only lowbit's files


def test_init_and_data_hash_identical_across_recipes(corpus, tmp_path):
    a = train(tiny_cfg(corpus, tmp_path / "a", tokens=2 * 2 * 4 * 32), progress=False)
    b = train(tiny_cfg(corpus, tmp_path / "b", tokens=2 * 2 * 4 * 32, recipe="bf16"), progress=False)
    c = train(tiny_cfg(corpus, tmp_path / "c", tokens=2 * 2 * 4 * 32, seed=1), progress=False)
    assert a.init_hash == b.init_hash and a.data_hash == b.data_hash
    assert a.init_hash != c.init_hash and a.data_hash != c.data_hash
    assert a.final_train_loss != b.final_train_loss  # bf16 autocast really changed the arithmetic


def test_errors_name_the_fix(corpus, tmp_path):
    with pytest.raises(ValueError, match="less than one optimizer step"):
        train(tiny_cfg(corpus, tmp_path / "a", tokens=100), progress=False)
    with pytest.raises(ValueError, match="exceeds model 'tiny'"):
        train(tiny_cfg(corpus, tmp_path / "b", seq_len=256), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(tiny_cfg(corpus, tmp_path / "c", device="cuda"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh runs it)")
@pytest.mark.parametrize("recipe", ["bf16", "fp8-tensor", "fp4-paper", "nvfp4", "quartet"])
def test_cuda_device(corpus, tmp_path, recipe):
    res = train(tiny_cfg(corpus, tmp_path / recipe, device="cuda", recipe=recipe), progress=False)
    assert math.isfinite(res.final_val_loss) and res.steps == 8


def test_deterministic_on_cpu(corpus, tmp_path):
    a = train(tiny_cfg(corpus, tmp_path / "a", tokens=3 * 2 * 4 * 32), progress=False)
    b = train(tiny_cfg(corpus, tmp_path / "b", tokens=3 * 2 * 4 * 32), progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


# --- resume ---------------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def interrupt_after(n_batches: int) -> type[Trainer]:
    """A Trainer whose batcher raises after `n_batches` training batches (a crash mid-run)."""
    def hook(drawn):
        if drawn >= n_batches:
            raise Interrupt
    return trainer_with_batch_hook(hook)


@pytest.mark.parametrize("recipe", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # CPU bf16 is slow
def test_resume_equals_uninterrupted_bit_for_bit(corpus, tmp_path, monkeypatch, recipe):
    full = train(tiny_cfg(corpus, tmp_path / "full", recipe=recipe), progress=False)

    out = tmp_path / "crashed"
    crashing = interrupt_after(2 * 5 + 1)  # dies inside step 6, after the step-3 checkpoint
    with pytest.raises(Interrupt):
        train(tiny_cfg(corpus, out, recipe=recipe), progress=False, trainer=crashing)
    assert [s for s, _ in ckpt_mod.list_checkpoints(out / "ckpt")] == [3]
    with pytest.raises(ValueError, match="not empty"):
        train(tiny_cfg(corpus, out, recipe=recipe), progress=False)
    res = train(tiny_cfg(corpus, out, recipe=recipe, resume=True), progress=False)
    assert res.resumed_from_step == 3 and res.steps == 8
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    # optimizer state too, and the metric rows (the rows logged after step 3 before the crash were replaced)
    sa = torch.load(tmp_path / "full/ckpt/step_0000008/state.pt", weights_only=True)
    sb = torch.load(out / "ckpt/step_0000008/state.pt", weights_only=True)
    for i, st in sa["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[k], sb["optimizer"]["state"][i][k])
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in res.history] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in full.history]
    assert res.final_val_loss == full.final_val_loss


def test_corrupt_newest_checkpoint_falls_back_with_warning(corpus, tmp_path, caplog):
    full = train(tiny_cfg(corpus, tmp_path / "full"), progress=False)
    out = tmp_path / "run"
    train(tiny_cfg(corpus, out), progress=False)
    newest = out / "ckpt/step_0000008"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # flip bits inside a weight
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt_mod.CheckpointError, match="does not match its sha256"):
        ckpt_mod.verify(newest)
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        res = train(tiny_cfg(corpus, out, resume=True), progress=False)
    assert any("step_0000008" in r.message and "corrupt" in r.message and "falling back" in r.message
               for r in caplog.records)
    assert res.resumed_from_step == 6
    ckpt_mod.verify(newest)  # rewritten, valid again
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    assert res.final_val_loss == full.final_val_loss


def test_all_checkpoints_corrupt_or_missing(corpus, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_cfg(corpus, out), progress=False)
    for _, d in ckpt_mod.list_checkpoints(out / "ckpt"):
        (d / "state.pt").write_bytes(b"junk")
    with pytest.raises(ckpt_mod.CheckpointError, match="all 2 are corrupt"):
        train(tiny_cfg(corpus, out, resume=True), progress=False)
    # a run dir without any checkpoint (e.g. stopped before its first): --resume starts from step 0 (with a warning);
    # a run dir that does not exist is an error (tests/test_bad_input.py)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        res = train(tiny_cfg(corpus, fresh, tokens=2 * 2 * 4 * 32, resume=True), progress=False)
    assert res.resumed_from_step is None and any("no checkpoint" in r.message for r in caplog.records)


def test_atomic_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    ckpt_mod.save(tmp_path, 1, model, {"step": 1}, {}, keep_last=3)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.save(tmp_path, 2, model, {"step": 2}, {}, keep_last=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]  # no step_2, no temp dir left behind
    assert ckpt_mod.latest_valid(tmp_path)[0].name == "step_0000001"


def test_tied_weights_round_trip(tmp_path):
    from lowbit.models import build_model

    torch.manual_seed(0)
    m = build_model("tiny", vocab_size=300, tie_embeddings=True)
    ckpt_mod.save(tmp_path, 1, m, {}, {}, keep_last=1)
    m2 = build_model("tiny", vocab_size=300, tie_embeddings=True)
    weights_mod.load_weights(m2, tmp_path / "step_0000001")
    assert m2.lm_head.weight.data_ptr() == m2.transformer.wte.weight.data_ptr()  # still tied
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


# --- non-finite steps -----------------------------------------------------------------------------------

def poison(bad_calls: set[int], params_too: bool = False) -> type[Trainer]:
    """A Trainer whose model's loss is NaN on the given training forward calls (1-based).
    params_too: also write a NaN into a weight at the first bad call (a blown-up update)."""
    calls = {"n": 0}

    def build(self, vocab_size):
        m = Trainer.build_model(self, vocab_size)
        fwd = m.forward

        def forward(idx, targets=None):
            bad = False
            if m.training:
                calls["n"] += 1
                bad = calls["n"] in bad_calls
                if bad and params_too:
                    with torch.no_grad():
                        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
            logits, loss = fwd(idx, targets)
            return logits, (loss * float("nan") if bad else loss)

        m.forward = forward
        return m

    return type("Poisoned", (Trainer,), {"build_model": build})


def test_nan_step_is_skipped(corpus, tmp_path, monkeypatch, caplog):
    poisoned = poison({3})  # grad_accum=1: training call 3 is step 3
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        res = train(tiny_cfg(corpus, tmp_path / "run", grad_accum=1, tokens=8 * 4 * 32, max_bad_steps=2), progress=False,
                    trainer=poisoned)
    assert res.diverged_at_step is None and res.steps == 8 and math.isfinite(res.final_val_loss)
    assert [r.message for r in caplog.records if "non-finite" in r.message][0].startswith("step 3: non-finite loss")
    state = torch.load(tmp_path / "run/ckpt/step_0000008/state.pt", weights_only=True)
    # AdamW counted only the 7 updates it made: step 3 was skipped
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {7.0}


def test_divergence_stops_run_and_never_checkpoints_nan(corpus, tmp_path, monkeypatch, caplog):
    # from step 5 on, a NaN weight makes every loss NaN; max_bad_steps=2 -> the 3rd bad step (7) stops the run
    poisoned = poison(set(range(5, 100)), params_too=True)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        res = train(tiny_cfg(corpus, out, grad_accum=1, tokens=8 * 4 * 32, max_bad_steps=2, ckpt_interval=1,
                            keep_last=10),
                    progress=False, trainer=poisoned)
    assert res.diverged_at_step == 5 and res.steps == 7
    assert math.isnan(res.final_train_loss)
    assert json.loads((out / "result.json").read_text())["diverged_at_step"] == 5
    steps = sorted(s for s, _ in ckpt_mod.list_checkpoints(out / "ckpt"))
    assert steps == [1, 2, 3, 4]  # steps 5 and 6 had NaN weights: refused
    assert any("not writing a checkpoint" in r.message for r in caplog.records)
    for _, d in ckpt_mod.list_checkpoints(out / "ckpt"):
        assert all(torch.isfinite(t).all() for t in load_file(d / "model.safetensors").values())
    # forensics: the NaN weight of h.0's c_fc is the first non-finite tensor, and the warning names it
    doc = json.loads((out / "divergence.json").read_text())
    assert doc["step"] == 7
    assert {k: doc["first"][k] for k in ("phase", "layer", "tensor")} == \
        {"phase": "forward", "layer": "transformer.h.0.mlp.c_fc", "tensor": "weight"}
    assert doc["first"]["nonfinite_frac"] == pytest.approx(1 / doc["first"]["shape"][0] / doc["first"]["shape"][1])
    before = [e for e in doc["events"] if e["order"] < doc["first"]["order"]]
    assert before and all(e["nonfinite_frac"] == 0 for e in before)  # the attention layers before it were clean
    stop = [r.message for r in caplog.records if r.message.startswith("stopping")][0]
    assert "transformer.h.0.mlp.c_fc weight in the forward pass" in stop


def test_forensics_names_the_quantized_operand(corpus, tmp_path):
    """Under a quantized recipe the per-GeMM statistics of the failing step are in divergence.json too."""
    poisoned = poison(set(range(3, 100)), params_too=True)
    out = tmp_path / "q"
    train(tiny_cfg(corpus, out, grad_accum=1, recipe="fp8-tensor", max_bad_steps=1), progress=False, trainer=poisoned)
    doc = json.loads((out / "divergence.json").read_text())
    w = [r for r in doc["quant_stats"] if r["layer"] == "transformer.h.0.mlp.c_fc" and r["operand"] == "weight"]
    assert w and w[0]["nonfinite"] > 0
    ok = [r for r in doc["quant_stats"] if r["layer"] == "transformer.h.0.attn.c_attn" and r["gemm"] == "fprop"]
    assert ok and all(r["nonfinite"] == 0 for r in ok)


# --- eval / load -------------------------------------------------------------------------------------

def test_load_checkpoint_and_evaluate_match_training(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out)
    res = train(cfg, progress=False)
    model, tok, cfg2 = load_checkpoint(out)
    assert tok.vocab_size == 257 and cfg2 == cfg and not model.training
    ds = prepare_dataset(str(corpus), tokenizer="bytes", val_fraction=cfg.val_fraction)
    ev = evaluate(model, ds, cfg2)
    assert ev["val_loss"] == pytest.approx(res.final_val_loss, rel=1e-6)  # same batches; summation order may differ
    assert ev["perplexity"] == pytest.approx(math.exp(ev["val_loss"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


# --- it learns ---------------------------------------------------------------------------------------

def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best context-free predictor."""
    counts = np.array(list(Counter(np.asarray(tokens).tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _learns(corpus, tmp_path, recipe):
    cfg = tiny_cfg(corpus, tmp_path / Path(recipe).stem, recipe=recipe, tokens=200 * 8 * 64, batch_size=8, seq_len=64,
                   grad_accum=1, lr=3e-3, eval_interval=50, eval_batches=4, log_interval=1, ckpt_interval=1000)
    res = train(cfg, progress=False)
    ds = prepare_dataset(str(corpus), tokenizer="bytes", val_fraction=cfg.val_fraction)
    h = unigram_entropy(ds.train)
    first = res.history[0]["train_loss"]  # step 1: the untrained model
    print(f"{recipe}: unigram entropy {h:.3f} nats; train loss step 1 {first:.3f} -> "
          f"final {res.final_train_loss:.3f}; val {res.final_val_loss:.3f}")
    # the grammar's bytes are far from independent: a model that only learned byte frequencies would sit at h;
    # well below it means it learned context. 0.5*h leaves room for recipe noise (fp32 reaches ~0.2*h).
    assert res.final_val_loss < 0.5 * h and res.final_train_loss < 0.5 * h
    assert first > h  # it started above the unigram entropy (a fresh model predicts ~uniformly: ln 257 = 5.55)
    return res


def test_tiny_learns_fp32(corpus, tmp_path):
    _learns(corpus, tmp_path, "fp32")


@pytest.mark.slow
def test_tiny_learns_fp4_paper(corpus, tmp_path):
    res = _learns(corpus, tmp_path, fp32_compute("fp4-paper", tmp_path))
    assert {"occ_clamped_frac", "underflow_frac_weight"} <= set(res.quant_stats)  # the paper's OCC is on
    assert 0 < res.quant_stats["occ_clamped_frac"] < 0.05  # alpha=0.99 clamps about 2% of activation entries


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nvfp4", "fp8-tensor-delayed"])
def test_resume_exact_with_stochastic_rounding_and_delayed_scaling(corpus, tmp_path, monkeypatch, name):
    """QLinear state outside the state_dict (SR generators, amax histories) is checkpointed too."""
    recipe = fp32_compute(name, tmp_path)
    train(tiny_cfg(corpus, tmp_path / "full", recipe=recipe), progress=False)
    with pytest.raises(Interrupt):
        train(tiny_cfg(corpus, tmp_path / "cut", recipe=recipe), progress=False, trainer=interrupt_after(2 * 5 + 1))
    train(tiny_cfg(corpus, tmp_path / "cut", recipe=recipe, resume=True), progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))


def test_one_step_equals_adamw_by_hand_with_clipping_and_decay_split(corpus, tmp_path):
    """One fp32 step of the trainer against AdamW written out here: the global-norm clip (to 1e-5, so the
    clipped gradients are comparable to eps and the update depends on the clip), decoupled decay on >= 2-D
    parameters only (LayerNorm weights of 1.0 would move by lr·wd = 5e-4 if decayed)."""
    from lowbit.data import Batcher
    from lowbit.models import build_model

    lr, wd, clip, b1, b2, eps = 1e-3, 0.5, 1e-5, 0.9, 0.95, 1e-8
    cfg = tiny_cfg(corpus, tmp_path / "run", tokens=4 * 32, grad_accum=1, warmup_steps=0, weight_decay=wd,
                   grad_clip=clip, lr=lr, beta1=b1, beta2=b2, recipe="fp32")
    ds = prepare_dataset(str(corpus), tokenizer="bytes", val_fraction=cfg.val_fraction)
    train(cfg, progress=False, dataset=ds)
    got = weights(tmp_path / "run")

    torch.manual_seed(cfg.seed)
    model = build_model("tiny", vocab_size=ds.tokenizer.vocab_size)
    x, y = Batcher(ds.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed).next()
    model(x, y.contiguous())[1].backward()
    params = dict(model.named_parameters())
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params.values()))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    assert coef < 1e-3  # the clip is active
    with torch.no_grad():
        for name, p in params.items():
            g = p.grad.double() * coef
            m, v = (1 - b1) * g, (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1), v / (1 - b2)
            want = p.double() * (1 - lr * (wd if p.dim() >= 2 else 0.0)) - lr * m_hat / (v_hat.sqrt() + eps)
            assert torch.allclose(got[name].double(), want, rtol=0, atol=2e-7), name  # fp32 rounding of ~0.02


def test_files_and_directories_keep_the_umask_mode(corpus, tmp_path):
    """Issue 21: result.json, config, checkpoints and caches were 0600/0700 (the atomic temp file's mode)."""
    import stat

    old = os.umask(0o022)
    try:
        train(tiny_cfg(corpus, tmp_path / "run", tokens=2 * 2 * 4 * 32, ckpt_interval=1), progress=False)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    ckpt = sorted((run / "ckpt").glob("step_*"))[-1]
    for p in (run / "result.json", ckpt / "meta.json", ckpt / "model.safetensors"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for p in (run, run / "ckpt", ckpt, run / "tokenizer"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p


def test_adamw_is_the_fused_kernel_on_cpu_with_decay_on_matrices_only():
    # The fused AdamW is 5x the foreach one on a CPU (bench: 7.8 vs 39.5 ms per step of `small`); weight decay goes
    # to matrices and embeddings, not to biases and norms. Bugs caught: foreach on CPU; decay on 1-D parameters.
    from types import SimpleNamespace
    from lowbit.train.runtime import make_optimizer
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
