"""Bad input to `lowbit train`: one test per case of issue 5. Each must print one `lowbit: error: ...` line that
names the problem and the fix, exit 2 without a traceback, and leave an existing run directory exactly as it was
(every case that gets far enough runs with --overwrite or --resume, so only the input checks protect the run)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from conftest import write_corpus
from lowbit import recipes
from lowbit.cli import main


def base_args(corpus, out, *extra) -> list[str]:
    return ["train", "--data", str(corpus), "--tokenizer", "bytes", "--tokens", "1k", "--batch-size", "4",
            "--seq-len", "32", "--eval-interval", "4", "--eval-batches", "2", "--log-interval", "2",
            "--device", "cpu", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A corpus and a finished tiny run (7 steps, checkpoints at 7), made once."""
    d = tmp_path_factory.mktemp("bad")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWBIT_CACHE", str(d / "cache"))
    corpus = write_corpus(d, "kings")
    run = d / "run"
    assert main(base_args(corpus, run)) == 0
    yield corpus, run
    mp.undo()


@pytest.fixture
def env(shared, tmp_path, monkeypatch):
    """(corpus, a fresh copy of the finished run, tmp_path)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(shared[1].parent / "cache"))
    run = tmp_path / "run"
    shutil.copytree(shared[1], run)
    return shared[0], run, tmp_path


def snapshot(d: Path) -> dict:
    """Every file under `d` with its sha256 and mtime (a deleted, rewritten or added file changes it)."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def fails(args, message, run: Path, capsys) -> str:
    before = snapshot(run)
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "usage:" not in err  # one line, not argparse's usage block
    assert snapshot(run) == before  # nothing lost, nothing rewritten
    return err


def test_unknown_recipe(env, capsys):
    corpus, run, _ = env
    err = fails(base_args(corpus, run, "--recipe", "fp3", "--overwrite"), "lowbit: error: unknown recipe 'fp3'", run,
                capsys)
    assert "fp4-paper" in err  # it lists the known ones


def test_unknown_model(env, capsys):
    corpus, run, _ = env
    fails(base_args(corpus, run, "--model", "gpt5", "--overwrite"),
          "lowbit: error: unknown model preset 'gpt5'; known presets: tiny", run, capsys)


def test_unknown_option(env, capsys):
    corpus, run, _ = env
    fails(base_args(corpus, run, "--learning-rate", "3e-4"), "unrecognized arguments: --learning-rate 3e-4", run, capsys)


@pytest.mark.parametrize("args, message", [
    (["train", "--tokns", "5"], "unrecognized arguments: --tokns 5 (did you mean --tokens?); see `lowbit train --help`"),
    (["trian", "--tokens", "5"], "invalid choice: 'trian'"),
    (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'; see `lowbit train --help`"),
    (["compare", "--recipes", "bf16", "--sed", "1"], "(did you mean --seed?); see `lowbit compare --help`"),
])
def test_command_line_errors_are_one_line_with_suggestions(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1 and message in err, err
    if args[0] == "trian":
        assert "(did you mean train?)" in err


def test_unknown_config_key(env, capsys):
    corpus, run, tmp = env
    conf = tmp / "run.toml"
    conf.write_text("learning_rate = 3e-4\n")
    fails(base_args(corpus, run, "--config", str(conf), "--overwrite"),
          "unknown TrainConfig key 'learning_rate'; valid keys: model", run, capsys)


def test_invalid_toml(env, capsys):
    corpus, run, tmp = env
    conf = tmp / "run.toml"
    conf.write_text('model = "tiny"\nlr = \n')
    fails(base_args(corpus, run, "--config", str(conf), "--overwrite"), f"lowbit: error: invalid TOML in config file {conf}",
          run, capsys)


def test_data_missing(env, capsys):
    corpus, run, tmp = env
    fails(base_args(tmp / "nope.txt", run, "--overwrite"), "does not exist; pass an existing file", run, capsys)


def test_data_empty(env, capsys):
    corpus, run, tmp = env
    empty = tmp / "empty.txt"
    empty.write_text("")
    fails(base_args(empty, run, "--overwrite"), f"--data file {empty} is empty", run, capsys)


def test_data_without_text(env, capsys):
    corpus, run, tmp = env
    p = tmp / "docs.jsonl"
    p.write_text('{"text": ""}\n{"text": ""}\n')
    fails(base_args(p, run, "--overwrite"), "no text found in", run, capsys)
    p.write_text('{"title": "Hamlet"}\n')
    fails(base_args(p, run, "--overwrite"), 'has no "text" field', run, capsys)


def test_corpus_shorter_than_one_batch(env, capsys):
    corpus, run, tmp = env
    short = tmp / "short.txt"
    short.write_text("the king rides to the castle. " * 4)  # 120 bytes: less than 4 x 32 tokens
    fails(base_args(short, run, "--overwrite", "--val-fraction", "0"),
          "tokens, less than one batch of batch_size*seq_len = 128", run, capsys)
    fails(base_args(short, run, "--overwrite"), "use more --data or a smaller --batch-size/--seq-len", run, capsys)
    tinier = tmp / "tinier.txt"
    tinier.write_text("the king.")
    fails(base_args(tinier, run, "--overwrite"), "too few for a train/val split", run, capsys)


def test_checkpoint_from_another_model(env, capsys):
    corpus, run, _ = env
    fails(base_args(corpus, run, "--resume", "--model", "llama-tiny"),
          "was trained with model='tiny', this run has model='llama-tiny'; resume with the same --model", run, capsys)


def test_checkpoint_with_another_vocabulary(env, capsys):
    """A checkpoint copied in from a run with another tokenizer (BPE-300 instead of bytes)."""
    corpus, run, tmp = env
    other = tmp / "bpe"
    assert main(base_args(corpus, other, "--tokenizer", "bpe", "--vocab-size", "300")) == 0
    capsys.readouterr()
    shutil.rmtree(run / "ckpt")
    shutil.copytree(other / "ckpt", run / "ckpt")
    err = fails(base_args(corpus, run, "--resume"), "that changes what is trained; resume with the run's own settings",
                run, capsys)
    assert "--tokenizer 'bytes' (the run has 'bpe')" in err and "--vocab-size 2048 (the run has 300)" in err


@pytest.mark.parametrize("extra, message", [
    (["--vocab-size", "1024"], "--vocab-size 1024 (the run has 2048)"),
    (["--recipe", "bf16"], "--recipe 'bf16' (the run has 'fp32')"),
    (["--seq-len", "16"], "--seq-len 16 (the run has 32)"),
    (["--lr", "3e-3"], "--lr 0.003 (the run has 0.001)"),
])
def test_resume_refuses_what_defines_the_run(env, capsys, extra, message):
    """Issue 14: a changed vocabulary or recipe used to be accepted with a warning and rewrote config.toml and
    meta.json; now it is refused and no file changes (fails() compares every file's bytes and mtime)."""
    corpus, run, _ = env
    err = fails(base_args(corpus, run, "--resume", *extra), message, run, capsys)
    assert "--overwrite or another --out" in err


def test_resume_of_a_finished_run_changes_nothing(env, capsys, caplog):
    corpus, run, _ = env
    before = snapshot(run)
    with caplog.at_level(logging.INFO, logger="lowbit"):
        assert main(base_args(corpus, run, "--resume")) == 0
    assert snapshot(run) == before
    result = json.loads((run / "result.json").read_text())
    assert f"{result['tokens_per_s']:,.0f} tokens/s" in capsys.readouterr().out  # the existing result, not nan
    assert any("already finished its 7 steps" in r.getMessage() for r in caplog.records)


def test_resume_accepts_free_settings_with_a_warning(env, caplog):
    corpus, run, _ = env
    args = base_args(corpus, run, "--resume", "--log-interval", "1")
    args[args.index("--tokens") + 1] = "2k"  # a longer budget: the run continues
    with caplog.at_level(logging.INFO, logger="lowbit"):
        assert main(args) == 0
    err = "\n".join(r.getMessage() for r in caplog.records)
    assert "resuming with changed settings" in err and "tokens: 1000 -> 2000" in err and "log_interval: 2 -> 1" in err
    assert json.loads((run / "result.json").read_text())["steps"] == 15


@pytest.mark.parametrize("extra", [["--recipe", "fp3"], ["--model", "gpt5"], ["--tokens", "100"],
                                   ["--seq-len", "512", "--tokens", "100k"], ["--data", "/nonexistent/x.txt"]])
def test_failed_checks_leave_no_new_path(env, capsys, extra):
    """Issue 14: input checks run before anything is created: a fresh --out stays absent."""
    corpus, _, tmp = env
    out = tmp / "fresh" / "run"
    assert main(base_args(corpus, out, *extra)) == 2
    assert not (tmp / "fresh").exists(), capsys.readouterr().err


def test_block_size_not_dividing_a_layer(env, capsys):
    corpus, run, tmp = env
    r = recipes.get("fp8-block")
    bad = r.replace(name="fp8-block-48", input=r.input.__class__(**{**r.input.__dict__, "block": 48}))
    path = tmp / "block48.toml"
    recipes.save(bad, path)
    err = fails(base_args(corpus, run, "--recipe", str(path), "--overwrite"),
                "quantizes input in tiles of 48, which does not divide layer transformer.h.0.attn.c_attn's "
                "in_features=128 (model 'tiny')", run, capsys)
    assert "(e.g. 128)" in err  # a block size that fits every layer


@pytest.mark.parametrize("value, message", [
    ("0", "lowbit: error: tokens must be > 0, got 0"),
    ("-5", "argument --tokens: bad count '-5': must not be negative"),
    ("-2M", "argument --tokens: bad count '-2M': must not be negative"),
])
def test_tokens_zero_or_negative(env, capsys, value, message):
    corpus, run, _ = env
    fails(base_args(corpus, run, "--overwrite", f"--tokens={value}"), message, run, capsys)  # the last --tokens wins


@pytest.mark.parametrize("extra, message", [
    (["--batch-size=-4"], "batch_size must be > 0, got -4"),
    (["--seq-len", "0"], "seq_len must be > 0, got 0"),
    (["--lr=-1e-3"], "lr must be a positive finite number"),
    (["--seq-len", "512", "--tokens", "100k"], "seq_len=512 exceeds model 'tiny'"),
])
def test_other_bad_numbers(env, capsys, extra, message):
    corpus, run, _ = env
    fails(base_args(corpus, run, "--overwrite", *extra), message, run, capsys)


def test_tokens_less_than_one_step(env, capsys):
    corpus, run, _ = env
    args = base_args(corpus, run, "--overwrite")
    args[args.index("--tokens") + 1] = "100"
    fails(args, "tokens=100 is less than one optimizer step", run, capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out(env, capsys):
    corpus, run, _ = env
    os.chmod(run, 0o555)
    try:
        fails(base_args(corpus, run, "--overwrite"), f"lowbit: error: cannot write to the run directory {run}: "
                                                     "Permission denied; choose a writable --out", run, capsys)
    finally:
        os.chmod(run, 0o755)


def test_unwritable_out(env, capsys):
    """An --out that cannot be created (under a file; fails for root too)."""
    corpus, run, tmp = env
    f = tmp / "a-file"
    f.write_text("x")
    fails(base_args(corpus, f / "run"), f"lowbit: error: cannot write to the run directory {f / 'run'}", run, capsys)
    fails(base_args(corpus, f), "is a file, not a directory; choose another --out", run, capsys)


def test_existing_run_without_resume_or_overwrite(env, capsys):
    corpus, run, _ = env
    fails(base_args(corpus, run), "already exists and is not empty; pass --resume to continue it, --overwrite",
          run, capsys)


def test_overwrite_after_checks_does_replace(env, capsys):
    """The control: with valid input, --overwrite does replace the run (so the tests above are not vacuous)."""
    corpus, run, _ = env
    before = snapshot(run)
    assert main(base_args(corpus, run, "--overwrite", "--seed", "1")) == 0
    assert snapshot(run) != before
    assert json.loads((run / "result.json").read_text())["steps"] == 7


def test_resume_of_a_directory_that_does_not_exist(env, capsys):
    """Issue 21: a typo in --out with --resume must not start a fresh run there."""
    corpus, run, tmp = env
    missing = tmp / "runs" / "doesnotexist"
    fails(base_args(corpus, missing, "--resume"), f"--resume: run directory {missing} does not exist", run, capsys)
    assert not missing.exists() and not missing.parent.exists()


@pytest.mark.parametrize("pattern, hint", [("firts:1", "did you mean first:1?"),
                                           ("transformer.h.0.attn.c_atn", "did you mean transformer.h.0.attn.c_attn?"),
                                           ("*.nothing", "matches no module")])
def test_high_precision_selection_that_matches_nothing(env, capsys, pattern, hint):
    corpus, run, _ = env
    err = fails(base_args(corpus, run, "--recipe", "fp4-direct", "--high-precision", pattern, "--overwrite"),
                f"high-precision pattern {pattern!r} matches no module of this model", run, capsys)
    assert hint in err


def test_a_token_budget_of_absurdly_many_passes(env, capsys):
    """Issue 21: --tokens 1e99 trained at lr 4e-95 for minutes; now refused, naming the bound."""
    corpus, run, _ = env
    fails(base_args(corpus, run, "--tokens", "1e99", "--overwrite"), "passes over the training split", run, capsys)


@pytest.mark.parametrize("args, message", [
    (["--recipe", "fp4-papr"], "unknown recipe 'fp4-papr' (did you mean fp4-paper?)"),
    (["--model", "llama-tinny"], "unknown model preset 'llama-tinny' (did you mean llama-tiny?)"),
])
def test_unknown_names_get_a_suggestion(env, capsys, args, message):
    corpus, run, _ = env
    fails(base_args(corpus, run, *args, "--overwrite"), message, run, capsys)


def test_a_bad_recipe_file_is_named(env, capsys, tmp_path):
    corpus, run, _ = env
    bad = tmp_path / "mine.toml"
    bad.write_text(recipes.get("fp4-direct").to_toml().replace('fmt = "e2m1"', 'fmt = "e2m11"', 1))
    err = fails(base_args(corpus, run, "--recipe", str(bad), "--overwrite"), f"recipe file {bad}: ", run, capsys)
    assert "unknown fmt 'e2m11' (did you mean e2m1?)" in err
