"""Zero-shot evaluation (`lowbit eval --tasks`): the lm-eval adapter's scores against the model's own
log-probabilities, a memorised task at 100% and an untrained model at chance, the paired interval by hand, the
task builder's held-out guarantee, the report section and the command line's refusals."""
from __future__ import annotations

import json
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit.cli import main
from lowbit.data import Tokenizer, prepare_dataset, train_bpe
from lowbit.downstream import items, paired, table, tasks
from lowbit.models import build_model, get_config

lm_eval = pytest.importorskip("lm_eval")
from lowbit.downstream import run  # noqa: E402  (after the skip: imports lm_eval's names lazily)
from lowbit.downstream.adapter import LowbitLM, windows  # noqa: E402

WORDS = ("sword king castle river quick brown fox jumps over lazy dog night morning gentle noble honest "
         "wherefore thou art speak grace heaven daughter").split()


class Req:  # what lm-eval hands a model: an Instance with .args
    def __init__(self, *args):
        self.args = args


def tiny_model(vocab: int, block: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config("tiny", vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def own_logprob(model, toks: list[int], start: int, t: int) -> torch.Tensor:
    """log p(toks[t] | toks[start:t]) from one forward pass over exactly that context."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([toks[start:t]]))
    return F.log_softmax(logits[0, -1].float(), -1)[toks[t]]


def test_windows_cover_every_target_once_with_at_most_block_inputs():
    # hand-made: 12 tokens, the last 9 scored, block 4 -> targets [8,12) from tokens[7:11], [4,8) from
    # tokens[3:7], [3,4) from tokens[0:2]. Bug caught: a window start off by one (a target conditioned on
    # one token too many, past the model's block, or a target scored twice/never).
    assert windows(12, 9, 4) == [(7, 8, 12), (3, 4, 8), (0, 3, 4)]
    for n, k, block in [(5, 1, 8), (30, 29, 7), (17, 10, 16), (9, 8, 1)]:
        ws = windows(n, k, block)
        covered = [t for _, lo, end in ws for t in range(lo, end)]
        assert sorted(covered) == list(range(n - k, n))
        assert all(end - 1 - s <= block and end - 1 - s >= end - lo for s, lo, end in ws)
    with pytest.raises(ValueError):
        windows(3, 3, 4)  # the first token has nothing to condition on


def test_loglikelihood_is_the_models_own_sum_across_a_token_boundary():
    # BPE on a text where "castle" is one token: the context "the cas" ends inside it. lm-eval's rule (and
    # ours): encode context+continuation whole; the continuation's tokens are those past the length of the
    # context's own encoding, and they are conditioned on that encoding. Bug caught: encoding the continuation
    # alone (other tokens, another sum), or conditioning on the whole encoding's prefix.
    tok = train_bpe([("the castle and the king " * 200)], vocab_size=300)
    ctx, cont = "the cas", "tle and the"
    whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))
    assert whole[:n_ctx] != tok.encode(ctx) or tok.encode(cont) != whole[n_ctx:]  # the boundary really is split
    model = tiny_model(tok.vocab_size, block=32)
    lm = LowbitLM(model, tok, _fp32(), batch_size=3, progress=False)
    (lp, greedy), = lm.loglikelihood([Req(ctx, cont)], disable_tqdm=True)
    seq = tok.encode(ctx) + whole[n_ctx:]
    want = sum(own_logprob(model, seq, 0, t) for t in range(n_ctx, len(seq)))
    assert lp == pytest.approx(float(want), rel=1e-5)
    logits, _ = model(torch.tensor([seq[:-1]]))
    assert greedy == bool((logits[0, n_ctx - 1:].argmax(-1) == torch.tensor(seq[n_ctx:])).all())


def test_continuation_longer_than_the_block_and_batching():
    # bytes tokenizer, block 8, a 20-byte continuation after a 3-byte context: each target token is scored from
    # the start of its window (hand list below), batched with short requests. Bug caught: truncating the
    # continuation to the block (its first tokens silently dropped) or padding leaking into a shorter row.
    tok = Tokenizer("bytes")
    model = tiny_model(tok.vocab_size, block=8)
    ctx, cont = "abc", "defghijklmnopqrstuvw"
    toks = tok.encode(ctx + cont)
    starts = {t: s for s, lo, end in windows(len(toks), len(cont), 8) for t in range(lo, end)}
    want = sum(own_logprob(model, toks, starts[t], t) for t in range(3, len(toks)))
    reqs = [Req("xy", "z"), Req(ctx, cont), Req("hello", " you")]
    got = LowbitLM(model, tok, _fp32(), batch_size=2, progress=False).loglikelihood(reqs, disable_tqdm=True)
    assert got[1][0] == pytest.approx(float(want), rel=1e-5)
    short = tok.encode("hello you")
    assert got[2][0] == pytest.approx(float(sum(own_logprob(model, short, 0, t) for t in range(5, 9))), rel=1e-5)
    rolling = LowbitLM(model, tok, _fp32(), progress=False).loglikelihood_rolling([Req(ctx + cont)])
    full = [tok.eot_id] + toks
    starts = {t: s for s, lo, end in windows(len(full), len(toks), 8) for t in range(lo, end)}
    assert rolling[0] == pytest.approx(float(sum(own_logprob(model, full, starts[t], t)
                                                 for t in range(1, len(full)))), rel=1e-5)


def _fp32():
    from lowbit import recipes
    return recipes.get("fp32")


def test_generate_until_is_greedy_and_stops():
    tok = Tokenizer("bytes")
    model = tiny_model(tok.vocab_size, block=16)
    lm = LowbitLM(model, tok, _fp32(), progress=False)
    out, = lm.generate_until([Req("abc", {"until": ["\u0000never"], "max_gen_toks": 5})])
    want = model.generate(torch.tensor([tok.encode("abc")]), 5, temperature=0.0)[0, 3:].tolist()
    assert out == tok.decode(want)  # bug caught: sampling instead of argmax, or one token too many/few
    first = out[1:2]
    if first:  # the greedy text cut at its second character
        cut, = lm.generate_until([Req("abc", {"until": [first], "max_gen_toks": 5})])
        assert cut == out[:out.index(first)]


def _memory_task(tmp_path, n: int = 12, seed: int = 0) -> tuple[list[dict], str]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(4)]
        rows.append({"context": f"Q{i:02d}\n", "choices": choices, "label": rng.randrange(4)})
    (tmp_path / "mem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mem.yaml").write_text(
        f"task: memory_test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: "
        f"{json.dumps(str(tmp_path / 'mem.jsonl'))}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    return rows, str(tmp_path)


def test_memorised_task_scores_100_and_untrained_model_chance(tmp_path):
    # through lm-eval end to end (its task YAML, its scoring). Bug caught: a label/choice mix-up anywhere in
    # the adapter (the memorised model then loses items) or a constant score (the untrained model at 0 or 100).
    rows, include = _memory_task(tmp_path)
    tok = Tokenizer("bytes")
    text = [tok.encode(r["context"] + r["choices"][r["label"]] + "\n") for r in rows]
    model = tiny_model(tok.vocab_size, block=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([t[:-1] for t in text])
    y = torch.tensor([t[1:] for t in text])
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tm = run.task_manager(["memory_test"], include)
    trained = run.run_lm(LowbitLM(model.eval(), tok, _fp32(), progress=False), ["memory_test"], tm)["memory_test"]
    assert trained["acc"] == 1.0 and trained["items"]["acc"] == [1.0] * len(rows)
    untrained = run.run_lm(LowbitLM(tiny_model(257), tok, _fp32(), progress=False), ["memory_test"], tm)
    assert 0.0 < untrained["memory_test"]["acc"] < 0.6  # chance 0.25 on 12 items


def test_paired_interval_by_hand():
    # d = [0,1,1,0,-1,0,0,0,1,0]: mean 0.2; sample sd^2 = 3.6/9 = 0.4; se = sqrt(0.4/10) = 0.2;
    # 95%: 0.2 ± 1.96*0.2. Discordant: b=3, c=1; McNemar exact p = 2*(C(4,0)+C(4,1))/2^4 = 0.625.
    # Bug caught: the population sd (se 0.1897) or a one-sided p (0.3125).
    a = [1, 1, 1, 0, 0, 1, 0, 1, 1, 1]
    r = [1, 0, 0, 0, 1, 1, 0, 1, 0, 1]
    p = paired.paired_difference(a, r)
    assert p["diff"] == pytest.approx(0.2) and p["se"] == pytest.approx(0.2)
    assert (p["lo"], p["hi"]) == pytest.approx((0.2 - paired.Z95 * 0.2, 0.2 + paired.Z95 * 0.2))
    assert (p["a_only"], p["ref_only"], p["n"]) == (3, 1, 10) and p["p"] == pytest.approx(0.625)
    assert p["within_noise"]
    q = paired.paired_difference([1] * 20, [0] * 20)  # every item flips: far outside noise
    assert (q["diff"], q["lo"], q["within_noise"]) == (1.0, 1.0, False) and q["p"] == pytest.approx(2 / 2 ** 20)
    with pytest.raises(ValueError):
        paired.paired_difference([1, 0], [1])


def synthetic_corpus(n_paras: int = 1500, seed: int = 1) -> list[str]:
    """Three documents of paragraphs (4-7 lines of 3-14 words), ~400 kB: enough lines for distractors."""
    rng = random.Random(seed)
    paras = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
                       for _ in range(rng.randint(4, 7))) for _ in range(n_paras)]
    third = n_paras // 3
    return ["\n\n".join(paras[i:i + third]) + "\n" for i in range(0, n_paras, third)]


def test_items_come_only_from_the_validation_split(tmp_path, private_cache):
    # the corpus tokenized as the trainer does (bytes, val_fraction 0.05): every item's passage lies in the
    # validation text and in none of the training text. Bug caught: source_pieces taking the head of the
    # corpus, or a passage glued across a blank line (not contiguous: found nowhere).
    docs = synthetic_corpus()
    d = tmp_path / "c"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"{i}.txt").write_text(doc)
    ds = prepare_dataset(str(d), tokenizer="bytes", val_fraction=0.05)
    tok = ds.tokenizer
    train, val = tok.decode([int(t) for t in ds.train]), tok.decode([int(t) for t in ds.val])
    pieces = items.source_pieces(docs)
    nl, lw = items.next_line_items(pieces, 50), items.last_word_items(pieces, 50)
    assert len(nl) == 50 and len(lw) == 50
    for it in nl + lw:
        assert it["passage"] in val and it["passage"] not in train
    for it in nl:
        true = it["choices"][it["label"]]
        assert it["passage"] == it["context"] + true and len(set(it["choices"])) == 4
        assert all(abs(len(c) - len(true)) <= items.LENGTH_SLACK * len(true) for c in it["choices"])
    for it in lw:
        assert it["passage"] == it["context"] + it["target"] and it["target"][1:].isalpha()
    assert nl == items.next_line_items(pieces, 50)  # deterministic


@pytest.fixture
def fake_corpora(monkeypatch, private_cache):
    """The built-in corpora replaced by synthetic text (tests never download)."""
    from lowbit.data import corpus

    monkeypatch.setitem(corpus.NAMED_CORPORA, "shakespeare", lambda cache_dir=None: synthetic_corpus(seed=1))
    monkeypatch.setitem(corpus.NAMED_CORPORA, "debian-docs", lambda cache_dir=None: synthetic_corpus(seed=2))


def _train(out, val_fraction="0.05", data="shakespeare"):
    assert main(["train", "--data", data, "--tokenizer", "bytes", "--model", "llama-nano", "--tokens",
                 "2k", "--batch-size", "4", "--seq-len", "32", "--val-fraction", val_fraction, "--eval-batches", "1",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0


def test_eval_cli_run_and_held_out_refusal(tmp_path, fake_corpora, capsys):
    # a run on the (fake) Shakespeare corpus: eval.json holds the task's items and metrics; a rerun reuses
    # them; a run whose validation split is too small to hold the items is refused. Bug caught: the held-out
    # check skipped (the val_fraction 0.005 run would be scored on its own training text).
    _train(tmp_path / "run")
    name = "lowbit_shakespeare_next_line"
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--tasks", name, "--limit", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    row = res["tasks"][name]
    assert row["n"] == 8 and len(row["items"]["acc"]) == 8 and row["acc"] == sum(row["items"]["acc"]) / 8
    assert res["recipe"] == "fp32" and res["average"]["acc"] == row["acc"] and f"{100 * row['acc']:.1f}" in printed
    # the same question again is answered from eval.json (bug caught: re-evaluating, or the settings not compared)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_lm", lambda *a, **k: pytest.fail("evaluated again"))
        assert run.eval_run(tmp_path / "run", [name], limit=8, device="cpu")["tasks"][name] == row
    # through a recipe: its own file, the fp32 results kept (bug caught: one eval.json overwritten by the other)
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--tasks", name, "--limit", "8", "--device", "cpu",
                 "--recipe", "fp8-tensor"]) == 0
    assert json.loads((tmp_path / "run" / "eval-fp8-tensor.json").read_text())["recipe"] == "fp8-tensor"
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == res
    _train(tmp_path / "small_val", val_fraction="0.005")
    rc = main(["eval", "--ckpt", str(tmp_path / "small_val"), "--tasks", name, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "not in this run's validation split" in err and "Traceback" not in err


def test_list_tasks(fake_corpora, capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out] == list(tasks.BUILTIN)
    rows = tasks.list_rows()
    assert {r["task"]: r["chance"] for r in rows}["lowbit_debian_docs_next_line"] == 0.25
    assert all(f"{r['items']} items" in ln for r, ln in zip(rows, out))


def test_refusals_are_one_line(tmp_path, fake_corpora, monkeypatch, capsys):
    _train(tmp_path / "run")
    cases = [(["--tasks", "lowbit_shakespeare_nextline"], "did you mean lowbit_shakespeare_next_line?"),
             (["--tasks", "lowbit", "--eval-batches", "3"], "apply to the validation loss"),
             (["--limit", "3"], "add --tasks")]
    for extra, message in cases:
        assert main(["eval", "--ckpt", str(tmp_path / "run"), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--tasks", "lowbit"]) == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


def test_offline_hub_task_is_one_line(tmp_path, fake_corpora, monkeypatch, capsys):
    # bug caught: the datasets ConnectionError escaping as a traceback. datasets and huggingface_hub read the
    # offline switches at import (lm_eval imported them already): set both the variables and their constants.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _train(tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--tasks", "piqa", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "HF_DATASETS_OFFLINE" in err and "--include-path" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_comparison_section_columns():
    # every number the section prints comes from the summary. Bug caught: lo and hi swapped, the reference
    # listed among the paired rows, or a task column shifted.
    def run_res(acc_items):
        rows = {n: {"n": len(v), "chance": 0.25, "acc": sum(v) / len(v), "acc_stderr": 0.01, "items": {"acc": v}}
                for n, v in acc_items.items()}
        return {"step": 7, "recipe": "fp32", "tasks": rows, "average": run.average(rows)}
    per_run = {"bf16": run_res({"t1": [1, 0, 1, 0], "t2": [1, 1, 0, 0]}),
               "fp4": run_res({"t1": [1, 1, 1, 0], "t2": [0, 1, 0, 0]})}
    s = table.comparison_summary(per_run, "bf16", ["t1", "t2"], {"bf16": 0.0, "fp4": 1.234})
    assert list(s["paired"]) == ["fp4"]
    lines = table.markdown_section(s)
    fp4_row = next(ln for ln in lines if ln.startswith("| `fp4` | 7 "))
    assert [c.strip() for c in fp4_row.split("|")[4:7]] == ["75.0 ± 1.0", "25.0 ± 1.0", "50.0"]
    pair = next(ln for ln in lines if ln.startswith("| `fp4` | +"))
    cells = [c.strip() for c in pair.split("|")[2:-1]]
    t1 = paired.paired_difference([1, 1, 1, 0], [1, 0, 1, 0])
    assert cells[0] == f"{100 * t1['diff']:+.1f} [{100 * t1['lo']:+.1f}, {100 * t1['hi']:+.1f}]"
    assert cells[2].startswith("+0.0 [") and cells[4] == "within noise" and cells[5] == "+1.23%"  # beside the loss


def test_hf_folder_scores_as_the_run(tmp_path, fake_corpora, monkeypatch):
    # lm-eval's own HF model on `lowbit export`'s folder answers every item as our adapter does on the run: an
    # independent implementation of the same scoring. Bug caught: any scoring rule of ours that lm-eval's HFLM
    # does not share (a shifted logit, the continuation tokens taken from the wrong end).
    pytest.importorskip("transformers")
    _train(tmp_path / "run")
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    rows, include = _memory_task(tmp_path / "run", n=16)
    ours = run.eval_run(tmp_path / "run", ["memory_test"], device="cpu", include_path=include, progress=False)
    theirs = run.eval_hf(tmp_path / "hf", ["memory_test"], device="cpu", include_path=include)
    assert ours["tasks"]["memory_test"]["items"] == theirs["tasks"]["memory_test"]["items"]
    assert 0 < sum(ours["tasks"]["memory_test"]["items"]["acc"]) < 16  # right on some items, wrong on others
    assert (tmp_path / "hf" / "eval.json").is_file() and ours["recipe"] == "fp32"


def test_compare_eval_tasks_writes_the_report_section(tmp_path, fake_corpora, capsys):
    # `lowbit compare --eval-tasks`: every run evaluated, eval.json with the paired rows, report.md's section
    # showing each run's accuracy from its own eval.json. Bug caught: the section missing from report.md (the
    # comparison's results.json rewritten without it) or a run's accuracy taken from another run.
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "bf16,fp4-direct", "--data", "shakespeare", "--tokenizer", "bytes",
                 "--model", "llama-nano", "--tokens", "2k", "--batch-size", "4", "--seq-len", "32",
                 "--eval-batches", "1", "--timing-rounds", "0", "--device", "cpu", "--out", str(out),
                 "--no-progress", "--eval-tasks", "lowbit_shakespeare_next_line"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert list(summary["runs"]) == ["bf16", "fp4-direct"] and list(summary["paired"]) == ["fp4-direct"]
    report_md = (out / "report.md").read_text()
    assert "## Zero-shot accuracy" in report_md and "accuracy verdict" in capsys.readouterr().out
    for label in ("bf16", "fp4-direct"):
        own = json.loads((out / "runs" / label / "eval.json").read_text())["tasks"]["lowbit_shakespeare_next_line"]
        row = next(ln for ln in report_md.splitlines() if ln.startswith(f"| `{label}` | "))
        assert f"{100 * own['acc']:.1f} ± {100 * own['acc_stderr']:.1f}" in row
    gap = json.loads((out / "results.json").read_text())["runs"]["fp4-direct"]["val_gap_pct"]
    paired_row = next(ln for ln in report_md.splitlines() if ln.startswith("| `fp4-direct` | +") or
                      ln.startswith("| `fp4-direct` | -"))
    assert paired_row.rstrip(" |").endswith(f"{gap:+.2f}%")  # the accuracy verdict beside the loss gap
