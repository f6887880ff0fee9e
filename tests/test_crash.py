"""Crash safety: a run SIGKILLed at a random step resumes to the same weights, bit for bit, as an uninterrupted run;
a truncated newest checkpoint falls back to the previous one with a warning; SIGINT/SIGTERM write a checkpoint
before stopping; a non-finite optimizer state is never written."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import final_weights, trainer_with_batch_hook
from lowbit.train import TrainConfig, Trainer, train
from lowbit.train import checkpoint as ckpt_mod
from lowbit.train.signals import TrainingInterrupted

CORPUS = "rivers"  # conftest's corpus fixture writes this one


def cfg_kw(corpus, out, steps=8, **kw) -> dict:
    base = dict(model="tiny", data=str(corpus), tokenizer="bytes", tokens=steps * 4 * 32, batch_size=4, seq_len=32,
                lr=3e-3, seed=0, device="cpu", eval_interval=4, eval_batches=2, log_interval=1, ckpt_interval=3,
                keep_last=2, out=str(out))
    base.update(kw)
    return base


def cli_args(kw: dict) -> list[str]:
    args = ["train"]
    for k, v in kw.items():
        if v is True:
            args.append("--" + k.replace("_", "-"))
        elif v is not False and v is not None:
            args += ["--" + k.replace("_", "-"), str(v)]
    return args + ["--no-progress"]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit


def subprocess_env() -> dict:
    # the child uses as many threads as this process, so its GeMMs sum in the same order as an in-process run
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


# --- SIGKILL -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_step_resumes_bit_for_bit(corpus, tmp_path):
    """Kill -9 the `lowbit train` process as soon as a seeded random step's checkpoint appears (it is then inside
    the next step or writing that step's checkpoint: every step writes one); resume; same bits as no crash."""
    steps = 24
    k = random.Random(1234).randint(2, steps - 4)
    full = train(TrainConfig(**cfg_kw(corpus, tmp_path / "full", steps=steps, ckpt_interval=1)), progress=False)
    out = tmp_path / "killed"
    kw = cfg_kw(corpus, out, steps=steps, ckpt_interval=1)
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *cli_args(kw)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "ckpt" / ckpt_mod.step_dir_name(k)
    deadline = time.monotonic() + 120
    try:
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
    assert not (out / "result.json").exists()
    newest = ckpt_mod.list_checkpoints(out / "ckpt")[0][0]
    assert k <= newest < steps
    res = train(TrainConfig(**kw, resume=True), progress=False)
    assert res.resumed_from_step is not None and k <= res.resumed_from_step and res.steps == steps
    assert not [p for p in (out / "ckpt").iterdir() if p.name.startswith((".tmp-", ".old-"))]  # debris cleaned
    assert_same(final_weights(tmp_path / "full"), final_weights(out))
    assert res.final_val_loss == full.final_val_loss


# --- a torn newest checkpoint ------------------------------------------------------------------------------

@pytest.mark.parametrize("victim", [ckpt_mod.MODEL_FILE, ckpt_mod.STATE_FILE, ckpt_mod.META_FILE])
def test_truncated_newest_checkpoint_falls_back_with_warning(corpus, tmp_path, caplog, victim):
    full = train(TrainConfig(**cfg_kw(corpus, tmp_path / "full")), progress=False)
    out = tmp_path / "run"
    train(TrainConfig(**cfg_kw(corpus, out)), progress=False)  # keeps the checkpoints of steps 6 and 8 (final)
    f = out / "ckpt" / ckpt_mod.step_dir_name(8) / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a torn write (e.g. a copy that ran out of disk)
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        res = train(TrainConfig(**cfg_kw(corpus, out, resume=True)), progress=False)
    warn = [r.message for r in caplog.records if "falling back to the previous checkpoint" in r.message]
    assert len(warn) == 1 and "step_0000008" in warn[0]
    assert res.resumed_from_step == 6 and res.steps == 8
    assert_same(final_weights(tmp_path / "full"), final_weights(out))
    assert res.final_val_loss == full.final_val_loss


# --- SIGINT / SIGTERM ----------------------------------------------------------------------------------

def signal_after(n_batches: int, sig: int) -> type[Trainer]:
    """A Trainer whose batcher sends `sig` to this process when it draws batch `n_batches` (mid-step)."""
    def hook(drawn):
        if drawn == n_batches - 1:
            os.kill(os.getpid(), sig)
    return trainer_with_batch_hook(hook)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_step_writes_checkpoint_and_resumes(corpus, tmp_path, monkeypatch, sig):
    full = train(TrainConfig(**cfg_kw(corpus, tmp_path / "full")), progress=False)
    out = tmp_path / "run"
    handler = signal.getsignal(sig)
    signalling = signal_after(5, sig)  # arrives during step 5; no periodic checkpoint at 5 (interval 3)
    with pytest.raises(TrainingInterrupted) as e:
        train(TrainConfig(**cfg_kw(corpus, out)), progress=False, trainer=signalling)
    assert (e.value.signum, e.value.step) == (sig, 5)
    assert isinstance(e.value, KeyboardInterrupt)  # callers that stop on Ctrl-C still do
    assert signal.getsignal(sig) is handler  # the trainer's handlers are removed again
    assert [s for s, _ in ckpt_mod.list_checkpoints(out / "ckpt")] == [5, 3]
    ckpt_mod.verify(out / "ckpt" / ckpt_mod.step_dir_name(5))
    assert not (out / "result.json").exists()
    res = train(TrainConfig(**cfg_kw(corpus, out, resume=True)), progress=False)
    assert res.resumed_from_step == 5
    assert_same(final_weights(tmp_path / "full"), final_weights(out))
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in full.history]


@pytest.mark.slow
def test_sigterm_to_cli_exits_143_with_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    kw = cfg_kw(corpus, out, steps=400, ckpt_interval=1000, eval_interval=1000)
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *cli_args(kw)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline and \
                not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (step, d), = ckpt_mod.list_checkpoints(out / "ckpt")
    assert 3 <= step < 400 and "Traceback" not in err
    assert f"lowbit: stopped by SIGTERM after step {step}; a checkpoint was written" in err
    ckpt_mod.verify(d)


# --- never write non-finite state -----------------------------------------------------------------------

def test_all_finite_walks_optimizer_state():
    good = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]}
    assert ckpt_mod.all_finite(good)
    bad = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([1.0, float("inf")])}}}
    assert not ckpt_mod.all_finite(bad)
    assert not ckpt_mod.all_finite({"x": [1, float("nan")]})
    assert ckpt_mod.all_finite(torch.tensor([1, 2]))  # integer tensors are always finite


def test_nan_optimizer_state_is_never_checkpointed(corpus, tmp_path, monkeypatch, caplog):
    """A NaN that reaches AdamW's moments (finite loss and gradient norm, so the step was not skipped) must not be
    saved: the checkpoints after it are refused with a warning, the earlier ones stay valid."""
    class Poisoned(Trainer):
        def make_optimizer(self, model):
            return poisoned_adamw(super().make_optimizer(model))

    def poisoned_adamw(opt):
        step = opt.step

        def poisoned_step(*sa, **sk):
            out = step(*sa, **sk)
            if opt.state and next(iter(opt.state.values()))["step"].item() == 4:
                next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
            return out

        opt.step = poisoned_step
        return opt

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowbit.train"):
        train(TrainConfig(**cfg_kw(corpus, out, ckpt_interval=1, keep_last=10)), progress=False, trainer=Poisoned)
    assert sorted(s for s, _ in ckpt_mod.list_checkpoints(out / "ckpt")) == [1, 2, 3]
    assert any("step 4: not writing a checkpoint" in r.message and "non-finite" in r.message for r in caplog.records)
    for _, d in ckpt_mod.list_checkpoints(out / "ckpt"):
        assert ckpt_mod.all_finite(torch.load(d / ckpt_mod.STATE_FILE, weights_only=True))


def test_a_quick_double_ctrl_c_stops_at_once(monkeypatch):
    """Issue 21: a second Ctrl-C within 1 s was taken for torchrun's forwarded copy and ignored. Outside torchrun
    any second Ctrl-C stops; under torchrun only a copy within DUPLICATE_WINDOW_S is ignored."""
    from lowbit.train import signals

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    req = signals.StopRequest()
    req._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        req._handle(signal.SIGINT, None)  # at once, however quick
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    req = signals.StopRequest()
    req._handle(signal.SIGINT, None)
    req._handle(signal.SIGINT, None)  # the forwarded copy: ignored
    req._t -= signals.DUPLICATE_WINDOW_S  # a person's second press
    with pytest.raises(KeyboardInterrupt):
        req._handle(signal.SIGINT, None)


@pytest.mark.parametrize("checkpointed, hint", [(False, "no checkpoint was written yet"),
                                                (True, "re-running with --resume")])
def test_ctrl_c_hint_says_what_was_saved(corpus, tmp_path, monkeypatch, capsys, checkpointed, hint):
    from lowbit.cli import main
    from lowbit.train import loop

    out = tmp_path / "run"
    if checkpointed:
        train(TrainConfig(**cfg_kw(corpus, out, steps=3)), progress=False)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert main(cli_args(cfg_kw(corpus, out, steps=3)) + ["--resume"] * checkpointed) == 130
    assert hint in capsys.readouterr().err
