"""End-to-end tests of the `lowbit` command: every subcommand on a tiny run in a tmp dir, --help for each,
and bad input -> `lowbit: error: ...` with exit status 2 (no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lowbit import recipes
from lowbit.cli import main
from lowbit.train import TrainConfig

CORPUS = "kings"  # conftest's corpus fixture writes this one

SUBCOMMANDS = ["train", "eval", "generate", "flops", "recipes", "compare"]


def tiny_args(corpus, out, *extra):
    return ["train", "--data", str(corpus), "--tokenizer", "bytes", "--tokens", "1k", "--batch-size", "4",
            "--seq-len", "32", "--eval-interval", "4", "--eval-batches", "2", "--log-interval", "2",
            "--device", "cpu", "--out", str(out), "--no-progress", *extra]


@pytest.fixture
def run_dir(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out)) == 0
    capsys.readouterr()
    return out


def test_train_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--lr", "2e-3", "--seed", "3")) == 0
    text = capsys.readouterr().out
    assert "7 steps, 896 tokens" in text and f"run directory: {out}" in text  # 1000 // (4*32) = 7 steps
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 7 and res["diverged_at_step"] is None
    cfg = TrainConfig.from_toml(out / "config.toml")
    assert (cfg.lr, cfg.seed, cfg.tokens, cfg.batch_size) == (2e-3, 3, 1000, 4)


def test_train_config_file_and_override(corpus, tmp_path, capsys):
    conf = tmp_path / "run.toml"
    conf.write_text('tokens = "2k"\nlr = 5e-4\nseed = 7\nbatch_size = 2\n')
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--config", str(conf), "--seed", "9")) == 0
    cfg = TrainConfig.from_toml(out / "config.toml")
    # tiny_args passes --tokens 1k and --batch-size 4 (override the file); lr from the file; --seed 9 wins
    assert (cfg.tokens, cfg.lr, cfg.seed, cfg.batch_size) == (1000, 5e-4, 9, 4)
    conf.write_text("learning_rate = 1e-3\n")
    assert main(tiny_args(corpus, tmp_path / "r2", "--config", str(conf))) == 2
    assert "lowbit: error: config file" in capsys.readouterr().err


def test_resume_and_overwrite_flags(run_dir, corpus, capsys):
    assert main(tiny_args(corpus, run_dir)) == 2
    assert "already exists and is not empty; pass --resume" in capsys.readouterr().err
    assert main(tiny_args(corpus, run_dir, "--resume")) == 0  # already finished: nothing left to train
    assert main(tiny_args(corpus, run_dir, "--overwrite")) == 0
    assert main(tiny_args(corpus, run_dir, "--resume", "--overwrite")) == 2
    assert "contradict" in capsys.readouterr().err


def test_eval(run_dir, capsys):
    result = json.loads((run_dir / "result.json").read_text())
    assert main(["eval", "--ckpt", str(run_dir), "--device", "cpu", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["val_loss"] == pytest.approx(result["final_val_loss"], rel=1e-6)  # same fixed batches as training
    assert ev["perplexity"] == pytest.approx(2.718281828459045 ** ev["val_loss"])
    ckpt = sorted((run_dir / "ckpt").iterdir())[-1]
    assert main(["eval", "--ckpt", str(ckpt), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "val_loss" in text and "perplexity" in text
    assert main(["eval", "--ckpt", str(run_dir), "--device", "cpu", "--recipe", "bf16", "--json"]) == 0
    ev16 = json.loads(capsys.readouterr().out)
    assert ev16["recipe"] == "bf16" and ev16["val_loss"] == pytest.approx(ev["val_loss"], abs=0.05)  # bf16 rounding


def test_generate(run_dir, capsys):
    args = ["generate", "--ckpt", str(run_dir), "--prompt", "the king", "--max-new-tokens", "20", "--top-k", "5",
            "--seed", "1", "--device", "cpu"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert a.startswith("the king") and len(a) > len("the king")
    assert main(args) == 0 and capsys.readouterr().out == a  # seeded: same text
    assert main(args[:-4] + ["--seed", "2", "--device", "cpu", "--temperature", "0"]) == 0  # greedy
    assert main(["generate", "--ckpt", str(run_dir), "--max-new-tokens", "5", "--device", "cpu"]) == 0  # empty prompt


class _Writes:
    """A stdout that records every write (to see tokens arrive one by one)."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_generate_streams_from_master_weights_by_default(corpus, tmp_path, capsys, monkeypatch):
    """Issue 14: `generate` samples from the fp32 master weights (not through the training recipe's FP4
    simulation) unless --recipe says so, and writes tokens as they come."""
    import torch

    from lowbit.models import build_model
    from lowbit.train import checkpoint, weights

    run = tmp_path / "fp4"
    assert main(tiny_args(corpus, run, "--recipe", "fp4-direct")) == 0
    capsys.readouterr()
    writes = _Writes()
    monkeypatch.setattr("sys.stdout", writes)
    args = ["generate", "--ckpt", str(run), "--prompt", "the", "--max-new-tokens", "30", "--seed", "3",
            "--temperature", "1.5", "--device", "cpu"]
    assert main(args) == 0
    text = "".join(writes.parts)
    assert len(writes.parts) >= 10  # streamed, not one write at the end
    meta = checkpoint.resolve(run)[1]
    from lowbit.models import config_from_dict

    plain = build_model(config_from_dict(meta["model_config"]))  # no convert: the master weights in fp32
    weights.load_weights(plain, checkpoint.resolve(run)[0])
    plain.eval()
    ids = torch.tensor([list(b"the")])
    want = plain.generate(ids, 30, temperature=1.5, generator=torch.Generator().manual_seed(3))[0, 3:].tolist()
    from lowbit.data import Tokenizer

    assert text == "the" + Tokenizer.load(run / "tokenizer").decode(want) + "\n"


def test_generate_and_eval_accept_a_comparison_directory(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "fp32,fp4-direct", "--data", str(corpus), "--tokenizer", "bytes",
                 "--tokens", "256", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--max-new-tokens", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a comparison directory; pick one of its runs with --run LABEL: fp32, fp4-direct" in err
    assert main(["generate", "--ckpt", str(out), "--run", "fp4-direct", "--prompt", "the", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["eval", "--ckpt", str(out), "--run", "fp32", "--device", "cpu", "--json"]) == 0
    assert main(["eval", "--ckpt", str(out), "--run", "bf16", "--device", "cpu"]) == 2
    assert "no run 'bf16'" in capsys.readouterr().err


def test_flops(capsys):
    assert main(["flops", "--model", "gpt2-small"]) == 0
    text = capsys.readouterr().out
    assert "163,009,536" in text and "tokens/s" not in text
    assert main(["flops", "--model", "tiny", "--seq", "64", "--mfu", "0.5", "--peak", "989"]) == 0
    text = capsys.readouterr().out
    assert "at seq 64" in text and "at 50% MFU" in text and "tokens/s" in text


def test_flops_list_is_every_registered_preset(capsys):
    from lowbit.models import PRESETS, build_model

    assert main(["flops", "--list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == list(PRESETS)
    for r in rows:  # the parameter column is the built model's count (meta device: no memory)
        if int(r[-1].replace(",", "")) < 20_000_000:
            assert int(r[-1].replace(",", "")) == build_model(r[0]).num_params()


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["recipes", "--show", "nvfp4"], ["train", "--help"],
                                  ["train", "--tokenz", "5"], ["compare", "--help"], ["flops"]])
def test_fast_commands_import_no_torch(args):
    """Help, recipes and argument errors answer without importing torch or the training stack (2 s)."""
    code = ("import sys\nfrom lowbit.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % (args,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "NO-TORCH", r.stderr[-2000:]


def test_recipes(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == recipes.names()
    assert all(recipes.get(ln.split()[0]).description in ln for ln in lines)
    assert main(["recipes", "--show", "fp4-paper"]) == 0
    assert recipes.Recipe.from_toml(capsys.readouterr().out) == recipes.get("fp4-paper")


def test_compare_registered(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--recipes", "fp32,fp4-direct", "--data", str(corpus), "--tokenizer", "bytes",
               "--tokens", "512", "--batch-size", "4", "--seq-len", "32", "--eval-interval", "2",
               "--eval-batches", "1", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "report.md").is_file()
    res = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in res["runs"].values()] == ["ok", "ok"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: lowbit {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--tokens", "lots"], "argument --tokens: bad count 'lots'"),
    (["train", "--batch-size", "two"], "argument --batch-size: invalid int value"),
    (["train", "--batch-size", "0", "--device", "cpu"], "lowbit: error: batch_size must be > 0"),
    (["train", "--recipe", "fp3"], "lowbit: error: unknown recipe 'fp3'"),
    (["train", "--config", "/nonexistent.toml"], "lowbit: error: config file /nonexistent.toml does not exist"),
    (["eval", "--ckpt", "/nonexistent"], "lowbit: error: /nonexistent does not exist"),
    (["eval"], "lowbit eval needs --ckpt DIR"),
    (["flops", "--model", "huge"], "lowbit: error: unknown model preset 'huge'"),
    (["flops", "--model", "tiny", "--mfu", "2"], "lowbit: error: mfu must be a fraction"),
    (["flops", "--model", "tiny", "--seq", "0"], "argument --seq: expected a positive integer"),
    (["flops"], "lowbit: error: lowbit flops needs --model NAME (or --list"),
    (["recipes", "--show", "nope"], "lowbit: error: unknown recipe 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_input_exits_2_with_message(args, message, capsys):
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_bad_checkpoint_dir_is_an_error_not_a_traceback(run_dir, capsys):
    assert main(["generate", "--ckpt", str(run_dir.parent), "--device", "cpu"]) == 2
    assert "lowbit: error: no checkpoint under" in capsys.readouterr().err


def test_python_m_lowbit_and_console_script(tmp_path):
    env = {**os.environ, "LOWBIT_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "lowbit", "recipes"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.split()[0] == "fp32"
    r = subprocess.run([sys.executable, "-m", "lowbit", "flops", "--model", "nope"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and r.stderr.startswith("lowbit: error: unknown model preset 'nope'")
    script = os.path.join(os.path.dirname(sys.executable), "lowbit")
    if os.path.exists(script):  # installed with pip install -e
        r = subprocess.run([script, "--help"], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "usage: lowbit" in r.stdout


def test_export_summary_states_size_against_bf16():
    from lowbit.commands import export_summary

    res = {"out": "x", "architecture": "GPT2LMHeadModel", "weights_format": "fp32", "weights_bytes": 2_000_000,
           "bf16_bytes": 1_000_000}
    assert "2.00x the 1.00 MB they take in bf16" in export_summary(res)  # an fp32 export is twice bf16, not 0.50x
    assert "0.55x" in export_summary({**res, "weights_format": "fp4", "weights_bytes": 550_000})


def test_nproc_sets_omp_threads_so_torchrun_prints_no_banner(monkeypatch):
    import torch.distributed.run as run_mod

    from lowbit.train import dist

    seen = {}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_mod, "run", lambda args: seen.setdefault("omp", os.environ.get("OMP_NUM_THREADS")))
    assert dist.launch(2, ["train", "--help"]) == 0
    assert seen["omp"] == str(max(1, (os.cpu_count() or 1) // 2))
