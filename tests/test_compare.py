"""lowbit.compare: run planning and sweep syntax, the orchestration (resume, divergence, failures,
like-for-like checks) against a stand-in trainer, and end-to-end runs of the real trainer on `tiny`."""
import dataclasses
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from conftest import trainer_with_batch_hook, write_corpus
from lowbit import comparison as cmp
from lowbit import recipes
from lowbit.train.rundir import RunDir

# --- sweep syntax and planning ------------------------------------------------------------------

def test_sweep_rejects_unknown_parameter_with_valid_list():
    with pytest.raises(ValueError) as e:
        cmp.parse_sweep(["dge.kk=1,2"])
    msg = str(e.value)
    assert "'dge.kk' (did you mean dge.k?)" in msg and len(msg) < 400  # a suggestion, not ~60 names
    for key in ("dge", "occ", "input", "weight", "grad_output", "fmt", "lowbit recipes --show"):
        assert key in msg
    with pytest.raises(ValueError, match="unknown sweep parameter"):
        cmp.plan_runs(["fp4-paper"], {"lr": [1e-3]})  # a train option, not a recipe parameter


@pytest.mark.parametrize("spec, match", [
    ("dge.k", "expected KEY=V1,V2"),
    ("dge.k=", "expected KEY=V1,V2"),
    ("dge.k=1,abc", "'abc' for 'dge.k' is not a finite number"),
    ("occ.compensate=maybe", "not true/false"),
    ("fmt=e2m1,e9m9", "e9m9"),
    ("dge.k=3,3", "repeats a value"),
])
def test_sweep_rejects_bad_values(spec, match):
    with pytest.raises(ValueError, match=match):
        cmp.parse_sweep([spec])


def test_sweep_parses_types():
    s = cmp.parse_sweep(["dge.k=1,3,5,10", "occ.compensate=on,false", "fmt=e2m1,e1m2,e3m0",
                         "amax_history_len=4,16"])
    assert s == {"dge.k": [1.0, 3.0, 5.0, 10.0], "occ.compensate": [True, False],
                 "fmt": ["e2m1", "e1m2", "e3m0"], "amax_history_len": [4, 16]}


def test_plan_runs_labels_and_reference_unswept():
    runs = cmp.plan_runs(["bf16", "fp4-paper"], {"dge.k": [1, 3], "fmt": ["e1m2"]})
    assert [r.label for r in runs] == ["bf16", "fp4-paper[dge.k=1]", "fp4-paper[dge.k=3]", "fp4-paper[fmt=e1m2]"]
    by = {r.label: r for r in runs}
    assert by["bf16"].recipe == recipes.get("bf16") and by["bf16"].param is None
    assert by["fp4-paper[dge.k=3]"].recipe.dge.k == 3.0
    assert by["fp4-paper[dge.k=3]"].recipe.occ == recipes.get("fp4-paper").occ  # nothing else changed
    fmt = by["fp4-paper[fmt=e1m2]"].recipe
    assert (fmt.input.fmt, fmt.weight.fmt, fmt.grad_output.fmt) == ("e1m2", "e1m2", "e5m2")  # FP4 operands only
    assert fmt.dge.k == recipes.get("fp4-paper").dge.k


def test_plan_runs_errors():
    with pytest.raises(ValueError, match="more than once"):
        cmp.plan_runs(["bf16", "bf16"])
    with pytest.raises(ValueError, match="none of the recipes"):
        cmp.plan_runs(["bf16", "fp32"], {"dge.k": [1]})
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        cmp.plan_runs(["nope"])
    with pytest.raises(ValueError, match="at least one recipe"):
        cmp.plan_runs([])


# --- orchestration with a stand-in trainer ----------------------------------------------------------

class FakeTrainer:
    """Stand-in for lowbit.train.train: deterministic per-recipe losses, writes result.json like the trainer,
    records every call. `fail` labels raise; lr > 100 diverges at step 3; `init_hash_for` overrides hashes."""

    def __init__(self, fail=(), init_hash_for=None, diverge=()):
        self.calls, self.datasets = [], []
        self.fail, self.init_hash_for, self.diverge = set(fail), init_hash_for or {}, set(diverge)
        self.data_hash_for: dict[str, str] = {}
        self.loss_fn = None  # (recipe name, seed) -> final loss, to override the per-name default

    def __call__(self, cfg, progress=True, dataset=None):
        self.calls.append(cfg)
        self.datasets.append(dataset)
        name = recipes.get(cfg.recipe).name
        if name in self.fail:
            raise RuntimeError(f"simulated crash in {name}")
        loss = 3.0 + (sum(map(ord, name)) % 100) / 100 if self.loss_fn is None else self.loss_fn(name, cfg.seed)
        diverged = 3 if cfg.lr > 100 or name in self.diverge else None
        hist = [{"step": s, "tokens": 1000 * s, "train_loss": loss + 1 / s, "val_loss": loss + 1 / s}
                for s in (1, 2, 3, 4)]
        res = {"final_train_loss": loss, "final_val_loss": float("nan") if diverged else loss, "steps": 4,
               "tokens": 4000, "tokens_per_s": 1000.0, "step_time_s": 0.5 + len(name) / 100,
               "peak_mem_bytes": 2**20, "quant_stats": {"underflow_frac": 0.1}, "wall_time_s": 2.0,
               "diverged_at_step": diverged, "history": hist[:3] if diverged else hist,
               "init_hash": self.init_hash_for.get(name, "a" * 64),
               "data_hash": self.data_hash_for.get(name, "b" * 64), "out": cfg.out}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "result.json").write_text(json.dumps(res))
        from lowbit.train import TrainResult

        return TrainResult.from_dict(res)


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeTrainer in place of lowbit.train.train and a counted stand-in prepare_dataset.
    Returns (trainer, TrainConfig, prepare calls)."""
    trainer_mod = importlib.import_module("lowbit.train")
    cls, trainer = trainer_mod.TrainConfig, FakeTrainer()
    monkeypatch.setattr(trainer_mod, "train", trainer)
    prepared = []

    def prepare_dataset(*args, **kw):
        prepared.append((args, kw))
        return types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=256))

    monkeypatch.setattr(importlib.import_module("lowbit.data"), "prepare_dataset", prepare_dataset)
    # the timing phase builds real models: a stand-in that "measures" the fake trainer's step times
    monkeypatch.setattr(importlib.import_module("lowbit.comparison.timing"), "measure", fake_measure)
    return trainer, cls, prepared


def fake_measure(cfgs, dataset, reference, device=None, rounds=3, steps=2):
    from lowbit.comparison import timing

    cost = {lab: 0.5 + len(recipes.get(cfg.recipe).name) / 100 for lab, cfg in cfgs.items()}
    return timing.summarize({lab: [[(c, 2 * c)] * steps] * rounds for lab, c in cost.items()}, reference,
                            0.0, 0.0, 2, rounds, steps)


def test_orchestration_records_and_shares_dataset(fake, tmp_path):
    trainer, Cfg, prepared = fake
    res = cmp.compare(["fp32", "bf16", "fp4-paper"], Cfg(tokens=4000, seed=7), tmp_path, progress=False)
    assert len(prepared) == 1 and len(trainer.calls) == 3
    assert all(d is trainer.datasets[0] for d in trainer.datasets)  # the one prepared dataset, every run
    assert [c.recipe for c in trainer.calls] == ["fp32", "bf16", "fp4-paper"]
    assert [Path(c.out).name for c in trainer.calls] == ["fp32", "bf16", "fp4-paper"]
    assert all(c.seed == 7 and c.tokens == 4000 for c in trainer.calls)
    assert res["reference"] == "bf16"
    r = res["runs"]["fp4-paper"]
    ref = res["runs"]["bf16"]["final_val_loss"]
    assert r["val_gap_abs"] == pytest.approx(r["final_val_loss"] - ref)
    assert r["val_gap_pct"] == pytest.approx(100 * (r["final_val_loss"] - ref) / ref)
    assert r["step_time_rel"] == pytest.approx((0.5 + 0.09) / (0.5 + 0.04))
    assert r["config"]["recipe"] == recipes.get("fp4-paper").to_dict()
    assert r["config"]["train"]["seed"] == 7
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert "--recipes fp32,bf16,fp4-paper" in res["command"] and "--seed 7" in res["command"]


def test_resume_skips_finished_and_retries_failed(fake, tmp_path):
    trainer, Cfg, _ = fake
    trainer.fail = {"bf16"}
    base = Cfg(tokens=4000)
    res = cmp.compare(["fp32", "bf16", "fp4-direct"], base, tmp_path, progress=False)
    assert res["runs"]["bf16"]["status"] == "failed: RuntimeError: simulated crash in bf16"
    assert res["runs"]["fp4-direct"]["status"] == "ok"          # ran after the failure
    assert res["failed"] == ["bf16"] and res["reference"] == "bf16"
    assert res["runs"]["fp32"]["val_gap_abs"] is None            # no reference loss to compare to
    assert "simulated crash" in (tmp_path / "runs/bf16/error.txt").read_text()
    done = tmp_path / "runs/fp32/result.json"
    mtime = done.stat().st_mtime_ns

    trainer.fail, trainer.calls = set(), []
    res = cmp.compare(["fp32", "bf16", "fp4-direct"], base, tmp_path, progress=False)
    assert [c.recipe for c in trainer.calls] == ["bf16"]          # only the failed one reruns
    assert done.stat().st_mtime_ns == mtime
    assert res["runs"]["fp32"]["reused"] and not res["runs"]["bf16"]["reused"]
    assert res["failed"] == [] and res["runs"]["fp32"]["val_gap_abs"] is not None

    with pytest.raises(ValueError, match="different configuration.*tokens") as e:
        cmp.compare(["fp32"], dataclasses.replace(base, tokens=8000), tmp_path, progress=False)
    assert "pass --overwrite (overwrite=True in Python)" in str(e.value)  # the CLI's words first
    trainer.calls = []
    cmp.compare(["fp32"], dataclasses.replace(base, tokens=8000), tmp_path, progress=False, overwrite=True)
    assert len(trainer.calls) == 1


def test_resume_passes_resume_for_checkpointed_run(fake, tmp_path):
    trainer, Cfg, _ = fake
    ck = tmp_path / "runs/bf16/ckpt/step_0000002"
    ck.mkdir(parents=True)
    (tmp_path / "runs/fp32").mkdir(parents=True)  # interrupted before any checkpoint
    cmp.compare(["bf16", "fp32"], Cfg(tokens=4000), tmp_path, progress=False)
    assert [(c.recipe, c.resume, c.overwrite) for c in trainer.calls] == [("bf16", True, False),
                                                                            ("fp32", False, True)]


def test_diverged_run_recorded_others_finish(fake, tmp_path):
    trainer, Cfg, _ = fake
    res = cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000, lr=1e3), tmp_path, progress=False)
    assert all(r["status"] == "diverged" and r["diverged_at_step"] == 3 for r in res["runs"].values())
    assert res["diverged"] == ["bf16", "fp4-paper"] and res["failed"] == []
    assert "diverged at step 3" in (tmp_path / "report.md").read_text()


def test_one_diverged_run_others_ok(fake, tmp_path):
    trainer, Cfg, _ = fake
    trainer.diverge = {"fp4-direct"}
    res = cmp.compare(["bf16", "fp4-direct", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=False)
    assert [r["status"] for r in res["runs"].values()] == ["ok", "diverged", "ok"]
    assert res["runs"]["fp4-direct"]["diverged_at_step"] == 3 and res["runs"]["fp4-direct"]["val_gap_abs"] is None
    assert res["runs"]["fp4-paper"]["val_gap_abs"] is not None
    trainer.calls = []
    cmp.compare(["bf16", "fp4-direct", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=False)
    assert trainer.calls == []  # a diverged run is finished (it has result.json): not retried


def test_mismatched_initial_weights_raise(fake, tmp_path):
    trainer, Cfg, _ = fake
    trainer.init_hash_for = {"fp4-paper": "c" * 64}
    with pytest.raises(RuntimeError, match="'fp4-paper' has different initial weights than 'bf16'"):
        cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["runs"]["fp4-paper"]["init_hash"] == "c" * 64


def test_mismatched_first_batch_raises(fake, tmp_path):
    trainer, Cfg, _ = fake
    trainer.data_hash_for = {"fp4-paper": "d" * 64}
    with pytest.raises(RuntimeError, match="'fp4-paper' has different first training batch than 'bf16'"):
        cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=False)


def test_sweep_runs_swept_recipes_by_toml(fake, tmp_path):
    trainer, Cfg, _ = fake
    res = cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000), tmp_path, sweep={"dge.k": [1, 3]},
                      progress=False)
    assert list(res["runs"]) == ["bf16", "fp4-paper[dge.k=1]", "fp4-paper[dge.k=3]"]
    passed = recipes.get(trainer.calls[2].recipe)   # a TOML path the trainer can load
    assert trainer.calls[2].recipe.endswith(".toml") and passed.dge.k == 3.0 and passed.dge.enabled
    assert res["runs"]["fp4-paper[dge.k=3]"]["sweep"] == {"param": "dge.k", "value": 3.0}
    assert len(trainer.calls) == 3
    assert (tmp_path / "sweep_dge_k.png").stat().st_size > 10_000
    assert "--sweep dge.k=1,3" in res["command"]


def test_sweep_trains_each_effective_recipe_once(fake, tmp_path):
    """fp4-paper[dge.k=5], [occ.alpha=0.99] and [fmt=e2m1] are all plain fp4-paper: trained once, reported
    under each label (each sweep chart needs its point)."""
    trainer, Cfg, _ = fake
    res = cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=False,
                      sweep={"dge.k": [3, 5], "occ.alpha": [0.99, 0.97], "fmt": ["e2m1"]})
    trained = [Path(c.out).name for c in trainer.calls]
    assert trained == ["bf16", "fp4-paper_dge.k-3", "fp4-paper_dge.k-5", "fp4-paper_occ.alpha-0.97"]
    runs = res["runs"]
    assert len(runs) == 6
    for label in ("fp4-paper[occ.alpha=0.99]", "fp4-paper[fmt=e2m1]"):
        assert runs[label]["same_run_as"] == "fp4-paper[dge.k=5]"
        assert runs[label]["final_val_loss"] == runs["fp4-paper[dge.k=5]"]["final_val_loss"]
    assert runs["fp4-paper[fmt=e2m1]"]["sweep"] == {"param": "fmt", "value": "e2m1"}
    assert runs["fp4-paper[fmt=e2m1]"]["config"]["recipe"]["name"] == "fp4-paper[fmt=e2m1]"


def test_cli_end_to_end_with_exit_status(fake, tmp_path, capsys):
    import argparse

    trainer, Cfg, _ = fake
    parser = argparse.ArgumentParser(prog="lowbit")
    cmp.add_cli(parser.add_subparsers(dest="cmd"))
    argv = ["compare", "--recipes", "bf16,fp4-paper", "--model", "tiny", "--tokens", "4000", "--seed", "3",
            "--lr", "0.002", "--out", str(tmp_path), "--sweep", "occ.alpha=0.99,0.97", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func is cmp.run_cli
    assert cmp.run_cli(args) == 0
    assert [Path(c.out).name for c in trainer.calls] == ["bf16", "fp4-paper_occ.alpha-0.99",
                                                         "fp4-paper_occ.alpha-0.97"]
    assert all(c.lr == 0.002 and c.seed == 3 and c.tokens == 4000 for c in trainer.calls)
    res = json.loads((tmp_path / "results.json").read_text())
    # the recorded command reproduces the run: parsing it again gives the same configuration
    import shlex
    again = parser.parse_args(shlex.split(res["command"])[1:])
    assert (again.recipes, again.tokens, again.seed, again.lr, again.sweep, again.out) == \
           ("bf16,fp4-paper", 4000, 3, 0.002, ["occ.alpha=0.99,0.97"], str(tmp_path))
    printed = capsys.readouterr().out
    table = printed.split("\n(every column:")[0].splitlines()[1:]  # after the "wrote ..." line
    assert table[0].split() == ["recipe", "val", "loss", "Δ", "vs", "bf16", "step", "time", "matched-loss", "cost"]
    assert [row.split()[0] for row in table[1:]] == list(res["runs"])
    assert max(map(len, table)) <= 100  # issue 21: a terminal's width, not the report's ~250 characters
    for row, r in zip(table[1:], res["runs"].values()):
        assert row.split()[1] == f"{r['final_val_loss']:.4f}" and row.split()[2] == f"{r['val_gap_pct']:+.2f}%"

    trainer.fail = {"fp4-paper[occ.alpha=0.97]"}
    args = parser.parse_args(["compare", "--recipes", "bf16,fp4-paper", "--tokens", "4000", "--seed", "3",
                              "--out", str(tmp_path / "b"), "--sweep", "occ.alpha=0.99,0.97", "--no-progress"])
    assert cmp.run_cli(args) == 1
    assert "1 run(s) failed: fp4-paper[occ.alpha=0.97]" in capsys.readouterr().err

    with pytest.raises(ValueError, match="unknown sweep parameter 'k'"):
        cmp.run_cli(parser.parse_args(["compare", "--out", str(tmp_path / "c"), "--sweep", "k=1"]))


def test_changed_recipe_definition_is_not_reused(fake, tmp_path):
    trainer, Cfg, _ = fake
    mine = dataclasses.replace(recipes.get("fp4-paper"), name="mine")
    cmp.compare([mine], Cfg(tokens=4000), tmp_path, progress=False)
    assert recipes.get(trainer.calls[0].recipe) == mine   # custom Recipe object handed over as a TOML file
    changed = mine.replace(**{"occ.alpha": 0.97})
    with pytest.raises(ValueError, match="recipe 'mine' differs"):
        cmp.compare([changed], Cfg(tokens=4000), tmp_path, progress=False)


# --- end to end with the real trainer ------------------------------------------------------------------



@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A local ~20 kB text file (no network) and a private token cache. Torch runs single-threaded here:
    a 4x32-token batch through `tiny` gains nothing from intra-op threads, and on a shared 2-core machine
    two threads per process made these tests ~5x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    yield from _corpus(tmp_path)
    torch.set_num_threads(threads)


def _corpus(tmp_path):
    yield write_corpus(tmp_path, "foxes")


def _tiny(corpus, **kw):
    TrainConfig = importlib.import_module("lowbit.train").TrainConfig
    # 6 steps of 4x32 tokens; eval and checkpoint every 2 steps so curves and resume points exist
    base = dict(model="tiny", data=str(corpus), tokenizer="bytes", tokens=6 * 4 * 32, batch_size=4, seq_len=32,
                lr=1e-3, seed=0, device="cpu", eval_interval=2, eval_batches=2, log_interval=1, ckpt_interval=2)
    base.update(kw)
    return TrainConfig(**base)


def test_real_compare_three_recipes(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    import numpy as np

    blob = np.ones(1 << 27)  # 1 GiB touched before the comparison: must not count as any run's peak memory
    del blob
    res = cmp.compare(["fp32", "bf16", "fp4-paper"], _tiny(corpus), out, progress=False)
    for name in ("results.json", "loss.png", "report.md"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text()) == res
    assert list(res["runs"]) == ["fp32", "bf16", "fp4-paper"] and res["reference"] == "bf16"
    runs = res["runs"]
    for r in runs.values():
        assert r["status"] == "ok", r["status"]
        for key in ("final_train_loss", "final_val_loss", "tokens_per_s", "step_time_s", "wall_time_s"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert isinstance(r["quant_stats"], dict)
        if sys.platform == "linux":  # per-run peak RSS (VmHWM reset before each run), far below the 1 GiB blob
            assert r["peak_mem_source"] == "rss" and 10 * 2**20 < r["peak_mem_bytes"] < 2**30
        assert r["config"]["train"]["seed"] == 0 and r["config"]["recipe"]["name"] == r["label"]
        assert any(row.get("val_loss") is not None for row in r["history"])
        assert (out / "runs" / r["label"] / "result.json").is_file()
    # like for like, asserted: identical initial weights and first batch in every run
    assert len({r["init_hash"] for r in runs.values()}) == 1
    assert len({r["data_hash"] for r in runs.values()}) == 1
    model = importlib.import_module("lowbit.models").build_model("tiny", vocab_size=res["model"]["vocab_size"])
    assert res["model"]["params"] == sum(p.numel() for p in model.parameters())
    ref = runs["bf16"]["final_val_loss"]
    gap = runs["fp4-paper"]["final_val_loss"] - ref
    assert runs["fp4-paper"]["val_gap_abs"] == pytest.approx(gap)
    assert runs["fp4-paper"]["val_gap_pct"] == pytest.approx(100 * gap / ref)
    assert runs["bf16"]["step_time_rel"] == pytest.approx(1.0)
    # issue 14: the step-time ratios come from the interleaved timing phase, not from the training runs
    t = res["timing"]
    assert set(t["per_recipe"]) == set(runs) and t["rounds"] == 3
    for label, r in runs.items():
        assert r["step_time_rel"] == pytest.approx(t["per_recipe"][label]["rel"])
        assert r["step_ms"] == pytest.approx(1e3 * t["per_recipe"][label]["step_s"])
    assert runs["fp4-paper"]["quant_stats"], "fp4-paper reports quantization statistics"
    md = (out / "report.md").read_text()
    assert "| fp4-paper |" in md and "(loss.png)" in md and "lowbit compare --recipes fp32,bf16,fp4-paper" in md
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "loss.png").stat().st_size > 20_000
    # issue 14: the comparison ends with a sample from the reference and the best quantized run (only one here),
    # the same text `lowbit generate` gives from that run's master weights with the same sampling settings
    assert list(res["samples"]) == ["bf16", "fp4-paper"]
    from lowbit.cli import main

    for label, text in res["samples"].items():
        assert f"**{label}**" in md and text in md
        assert main(["generate", "--ckpt", str(out), "--run", label, "--prompt", cmp.runner.SAMPLE_PROMPT,
                     "--max-new-tokens", str(cmp.runner.SAMPLE_TOKENS), "--temperature",
                     str(cmp.runner.SAMPLE_TEMPERATURE), "--top-k", str(cmp.runner.SAMPLE_TOP_K), "--seed",
                     str(cmp.runner.SAMPLE_SEED), "--device", "cpu"]) == 0
        assert capsys.readouterr().out == text + "\n"


def test_real_divergence_does_not_stop_others(corpus, tmp_path, monkeypatch):
    """lr=1e3 drives every run to a non-finite loss: each is recorded as diverged, at its step, and all
    three are attempted (the first divergence does not end the comparison)."""
    seen = []
    trainer = importlib.import_module("lowbit.train")
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: seen.append(cfg.recipe) or real(cfg, **kw))
    res = cmp.compare(["bf16", "fp32", "fp4-direct"], _tiny(corpus, lr=1e3, tokens=8 * 4 * 32), tmp_path,
                      progress=False)
    assert seen == ["bf16", "fp32", "fp4-direct"]
    for r in res["runs"].values():
        assert r["status"] == "diverged" and isinstance(r["diverged_at_step"], int), (r["label"], r["status"])
    assert "diverged at step" in (tmp_path / "report.md").read_text()


def test_real_resume_reuses_finished_and_resumes_interrupted(corpus, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the second run (after its step-2 checkpoint), then the same call again:
    the finished first run is reused untouched, the second resumes from its checkpoint and ends like an
    uninterrupted run."""
    trainer = importlib.import_module("lowbit.train")
    real_train, calls = trainer.train, []

    def ctrl_c(drawn):
        if drawn >= 3:  # inside step 4: steps 1-3 done, checkpoint at step 2 written
            raise KeyboardInterrupt
    CtrlC = trainer_with_batch_hook(ctrl_c)

    crashed = []

    def train_spy(cfg, **kw):
        calls.append((Path(cfg.out).name, cfg.resume))
        crash = Path(cfg.out).name == "bf16" and not crashed
        if crash:
            crashed.append(cfg.out)
        return real_train(cfg, **kw, trainer=CtrlC if crash else trainer.Trainer)

    monkeypatch.setattr(trainer, "train", train_spy)
    base = _tiny(corpus)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(["fp32", "bf16"], base, tmp_path / "cmp", progress=False)
    done = tmp_path / "cmp/runs/fp32/result.json"
    mtime = done.stat().st_mtime_ns
    assert not (tmp_path / "cmp/runs/bf16/result.json").exists()
    assert RunDir(tmp_path / "cmp/runs/bf16").has_checkpoint()

    calls.clear()
    res = cmp.compare(["fp32", "bf16"], base, tmp_path / "cmp", progress=False)
    assert calls == [("bf16", True)]                       # fp32 not retrained; bf16 resumed
    assert done.stat().st_mtime_ns == mtime and res["runs"]["fp32"]["reused"]
    bf16 = res["runs"]["bf16"]
    assert bf16["status"] == "ok" and bf16["steps"] == 6 and not bf16["reused"]
    assert json.loads((tmp_path / "cmp/runs/bf16/result.json").read_text())["resumed_from_step"] == 2
    # resuming is exact on CPU: same final losses as an uninterrupted comparison
    ref = cmp.compare(["bf16"], base, tmp_path / "ref", progress=False)
    assert bf16["final_val_loss"] == ref["runs"]["bf16"]["final_val_loss"]
    assert bf16["final_train_loss"] == ref["runs"]["bf16"]["final_train_loss"]


def test_progress_lines_when_not_a_terminal(fake, tmp_path, capsys):
    trainer, Cfg, _ = fake
    cmp.compare(["bf16", "fp4-paper"], Cfg(tokens=4000), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "[compare] recipe 1/2: bf16" in err and "[compare] recipe 2/2: fp4-paper" in err
    assert "[compare] fp4-paper: ok, val loss" in err


def test_cli_default_eval_interval_gives_about_ten_points(fake, tmp_path):
    """Without --eval-interval (on the command line or in --config), compare evaluates about 10 times per run
    (steps // 10, at most TrainConfig's 100); an explicit value from either source wins."""
    import argparse

    trainer, _, _ = fake
    parser = argparse.ArgumentParser(prog="lowbit")
    cmp.add_cli(parser.add_subparsers(dest="cmd"))
    common = ["compare", "--recipes", "bf16", "--tokens", str(40 * 16 * 128), "--no-progress"]  # 40 steps
    assert cmp.run_cli(parser.parse_args(common + ["--out", str(tmp_path / "a")])) == 0
    assert trainer.calls[-1].eval_interval == 4
    assert cmp.run_cli(parser.parse_args(common + ["--out", str(tmp_path / "b"), "--eval-interval", "7"])) == 0
    assert trainer.calls[-1].eval_interval == 7
    (tmp_path / "c.toml").write_text("eval_interval = 9\n")
    assert cmp.run_cli(parser.parse_args(common + ["--out", str(tmp_path / "c"), "--config",
                                                   str(tmp_path / "c.toml")])) == 0
    assert trainer.calls[-1].eval_interval == 9
    long_run = types.SimpleNamespace(tokens=5000 * 16 * 128, batch_size=16, seq_len=128, grad_accum=1,
                                     eval_interval=100)
    assert cmp.default_eval_interval(long_run) == 100  # capped at the configured interval
    short = types.SimpleNamespace(tokens=8 * 16 * 128, batch_size=16, seq_len=128, grad_accum=1, eval_interval=100)
    assert cmp.default_eval_interval(short) == 2  # 8 steps: 4 evaluations, not one after every step


def test_run_directories_need_no_shell_quoting():
    from lowbit.comparison.sweep import dirname

    for label in ("fp4-paper[dge.k=3]", "fp4-paper[fmt=e2m1]", "fp4-paper[occ.alpha=0.999]", "my recipe (v2)"):
        assert not set(dirname(label)) & set("[]=() *?$'\"\\"), dirname(label)
    assert dirname("fp4-paper[dge.k=3]") == "fp4-paper_dge.k-3"
    assert len({dirname(x) for x in ("a[k=1]", "a[k=2]", "a[j=1]")}) == 3


def test_eta_from_the_cost_of_finished_runs():
    """Issue 14: bf16 took 60 s, fp8 200 s: two more quantized runs are ~400 s, one bf16-like run 60 s (not the
    mean over runs times their count); after a resume the reused runs count with the time they recorded."""
    from lowbit.comparison.records import eta_seconds

    assert eta_seconds([(False, 60.0), (True, 200.0)], [True, True]) == pytest.approx(400.0)
    assert eta_seconds([(False, 60.0), (True, 200.0)], [False]) == pytest.approx(60.0)
    assert eta_seconds([(False, 60.0)], [True]) == pytest.approx(60.0)  # no quantized run yet: the mean of all
    assert eta_seconds([], [True]) is None and eta_seconds([(True, 1.0)], []) == 0.0
    fresh = eta_seconds([(False, 60.0), (True, 200.0)], [True])
    resumed = eta_seconds([(False, 60.0), (True, 200.0)], [True])  # the same runs, reused from result.json
    assert fresh == resumed == pytest.approx(200.0)


def test_cli_timing_rounds_zero_skips_the_timing_phase(fake, tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="lowbit")
    cmp.add_cli(parser.add_subparsers(dest="cmd"))
    args = ["compare", "--recipes", "bf16,fp4-paper", "--tokens", "4000", "--no-progress", "--out"]
    assert cmp.run_cli(parser.parse_args(args + [str(tmp_path / "a"), "--timing-rounds", "0"])) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert "timing" not in res and res["runs"]["fp4-paper"]["step_time_rel"] == pytest.approx(
        res["runs"]["fp4-paper"]["step_time_s"] / res["runs"]["bf16"]["step_time_s"])  # training's own ratio
    assert cmp.run_cli(parser.parse_args(args + [str(tmp_path / "b")])) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["timing"]["rounds"] == 3


# --- seeds -------------------------------------------------------------------------------------------

def test_t_interval_hand_computed():
    from lowbit.comparison.seeds import t975, t_interval

    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975,2} = 4.303: 2 ± 4.303/sqrt(3)
    assert (lo, hi) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert t_interval([1.0]) is None
    assert t975(40) == pytest.approx(2.021, abs=1e-3) and t975(120) == pytest.approx(1.980, abs=1e-3)


def test_seeds_aggregate_verdicts_and_resume(fake, tmp_path):
    """Three seeds: "worse" is 0.1 above bf16 in every seed (a clear gap), "noisy" alternates around it."""
    from lowbit.comparison.seeds import compare_seeds

    trainer, Cfg, _ = fake
    noise = {1: 0.02, 2: -0.03, 3: 0.015}
    trainer.loss_fn = lambda name, seed: {"bf16": 3.0 + noise[seed], "fp8-tensor": 3.0 + noise[seed] + 0.1,
                                          "fp4-paper": 3.0 + noise[seed] * (-2)}[name]
    trainer.fail = {"fp4-paper"}  # interrupted: fp4-paper fails in every seed on the first attempt
    agg = compare_seeds(["bf16", "fp8-tensor", "fp4-paper"], Cfg(tokens=4000), tmp_path, [1, 2, 3], cmp.compare,
                        progress=False)
    assert len(trainer.calls) == 9 and agg["failed"] == [f"fp4-paper (seed {s})" for s in (1, 2, 3)]
    trainer.fail = set()
    agg = compare_seeds(["bf16", "fp8-tensor", "fp4-paper"], Cfg(tokens=4000), tmp_path, [1, 2, 3], cmp.compare,
                        progress=False)
    assert len(trainer.calls) == 12  # only the failed runs were retried
    assert {c.seed for c in trainer.calls[-3:]} == {1, 2, 3}
    r = agg["runs"]
    assert r["fp8-tensor"]["gap_mean"] == pytest.approx(0.1) and r["fp8-tensor"]["verdict"] == "worse"
    assert r["fp8-tensor"]["gap_ci95"] == pytest.approx([0.1, 0.1], abs=1e-9)
    gaps = [-3 * noise[s] for s in (1, 2, 3)]
    from lowbit.comparison.seeds import t_interval

    assert r["fp4-paper"]["gap_ci95"] == pytest.approx(list(t_interval(gaps)))
    assert r["fp4-paper"]["verdict"] == "within noise" and r["bf16"]["verdict"] == "reference"
    assert r["bf16"]["val_loss_mean"] == pytest.approx(3.0 + sum(noise.values()) / 3)
    assert (tmp_path / "seed2" / "results.json").is_file() and (tmp_path / "seeds.md").is_file()
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [1, 2, 3]


def test_seed_band_is_min_to_max_over_seeds():
    from lowbit.report_charts import seed_band_series

    def res(v):
        return {"runs": {"bf16": {"history": [{"tokens": 10, "val_loss": v}, {"tokens": 20, "val_loss": v - 1}]}}}
    ts, mean, lo, hi = seed_band_series({1: res(5.0), 2: res(4.0), 3: res(6.0)})["bf16"]
    assert ts == [10, 20] and mean == [5.0, 4.0] and lo == [4.0, 3.0] and hi == [6.0, 5.0]


def test_seeds_cli_errors():
    from lowbit.comparison.cli import parse_seeds

    assert parse_seeds("1,2, 3") == [1, 2, 3]
    for bad in ("1,x", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_time_left_counts_only_runs_that_will_train(fake, tmp_path, capsys):
    """Issue 21: "~45 s left" was printed while every remaining run was reused."""
    trainer, Cfg, _ = fake
    base = Cfg(model="tiny", tokens=4000)
    cmp.compare(["bf16", "fp8-tensor", "fp4-paper"], base, str(tmp_path), progress=True)
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[compare] bf16:")]
    assert first and "left" in first[0]  # two runs still to train after bf16
    cmp.compare(["bf16", "fp8-tensor", "fp4-paper"], base, str(tmp_path), progress=True)  # all reused
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[compare] ")]
    assert lines and not any("left" in line for line in lines)
