"""Multi-process training on CPU (gloo): DDP and FSDP2 against one process with the same global batch, resume of
a 2-rank checkpoint (on 2 ranks bit for bit, on 1 rank within tolerance), the torchrun launcher (`--nproc`), and
the process-group helpers.

The 2-rank runs are forked from the test process when it runs single-threaded (torch is already imported: ~1 s per
run instead of ~10 s for torchrun's fresh interpreters; spawned otherwise) and call `lowbit.train.train` with the environment torchrun would set, so they
take the same code path as `torchrun -m lowbit train`; one slow test goes through the real launcher."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import final_weights, fp32_compute
from lowbit.cli import main
from lowbit.train import TrainConfig, train
from lowbit.train import checkpoint as ckpt_mod
from lowbit.train import dist as dist_mod
from lowbit.train import weights as weights_mod

CORPUS = "rivers"  # conftest's module_corpus fixture writes this one

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 6


def cfg_kw(module_corpus, out, **kw) -> dict:
    # 6 steps of 2 micro-batches of a global batch of 4 x 32 tokens (grad_accum 2 exercises no_sync)
    base = dict(model="tiny", data=str(module_corpus), tokenizer="bytes", tokens=STEPS * 2 * 4 * 32, batch_size=4, seq_len=32,
                grad_accum=2, lr=3e-3, warmup_steps=1, seed=0, device="cpu", eval_interval=3, eval_batches=2,
                log_interval=1, ckpt_interval=3, keep_last=3, out=str(out))
    base.update(kw)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, kw: dict, cache: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOWBIT_CACHE=cache)
    torch.set_num_threads(1)
    train(TrainConfig(**kw), progress=False)


def run_world(world: int, kw: dict) -> list[dict]:
    """Train `kw` in `world` forked gloo processes (as torchrun would); returns rank 0's metric rows."""
    cache = os.environ["LOWBIT_CACHE"]
    # fork is fast (torch already imported) but only safe while this process has not started an OpenMP pool
    method = "fork" if torch.get_num_threads() == 1 else "spawn"
    mp.start_processes(_rank_main, args=(world, free_port(), kw, cache), nprocs=world, start_method=method)
    return rows(Path(kw["out"]))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(module_corpus, tmp_path_factory):
    """One process, DDP on 2 ranks and FSDP2 on 2 ranks: the same 6 steps of the same global batches."""
    root = tmp_path_factory.mktemp("runs")
    mp_env = pytest.MonkeyPatch()
    mp_env.setenv("LOWBIT_CACHE", str(root / "cache"))
    single = train(TrainConfig(**cfg_kw(module_corpus, root / "one")), progress=False)
    out = {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    run_world(2, cfg_kw(module_corpus, out["ddp"]))
    run_world(2, cfg_kw(module_corpus, out["fsdp"], fsdp=True))
    yield out, single
    mp_env.undo()


# Tolerance: both runs see identical weights and the same 4 global rows per micro-batch; only the fp32 summation
# order differs (two 2-row means averaged across ranks vs one 4-row mean; DDP/FSDP2 average the two ranks'
# gradients), ~1e-7 relative per step, which Adam (per-weight normalised steps, lr 3e-3) carries along for 6 steps:
# the measured largest train-loss difference is 6e-8 (printed with -s). 1e-5 leaves 100x headroom and is far below
# what a wrong data split changes (another batch moves the loss by > 1e-3: test_tolerance_discriminates).
RTOL = 1e-5


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, kind):
    out, single = runs
    a, b = rows(out["one"]), rows(out[kind])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    spread = max(abs(rb["train_loss"] - ra["train_loss"]) / ra["train_loss"] for ra, rb in zip(a, b))
    print(f"{kind}: largest relative train-loss difference to one process {spread:.2e}")
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=RTOL), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=RTOL), ra["step"]
        assert (ra["val_loss"] is None) == (rb["val_loss"] is None)
        if ra["val_loss"] is not None:  # averaged over the ranks' halves of each validation batch
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=RTOL), ra["step"]
    assert a[0]["train_loss"] > a[-1]["train_loss"] + 0.1  # it trained
    wa, wb = final_weights(out["one"]), final_weights(out[kind])
    assert wa.keys() == wb.keys()
    for k in wa:  # same state_dict layout (FSDP2 shards gathered back to full tensors); Adam steps are ~lr=3e-3
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)
    result = json.loads((out[kind] / "result.json").read_text())
    assert result["steps"] == STEPS and result["tokens"] == STEPS * 2 * 4 * 32  # global tokens
    assert result["final_val_loss"] == pytest.approx(single.final_val_loss, rel=RTOL)


def test_tolerance_discriminates(runs, module_corpus, tmp_path):
    """What RTOL must catch: training on half the global batch (one rank's slice only) moves the loss by far more."""
    out, _ = runs
    half = train(TrainConfig(**cfg_kw(module_corpus, tmp_path / "half", batch_size=2, tokens=STEPS * 2 * 2 * 32)),
                 progress=False)
    full = rows(out["one"])
    worst = max(abs(h["train_loss"] - f["train_loss"]) / f["train_loss"] for h, f in zip(half.history[1:], full[1:]))
    assert worst > 100 * RTOL


def test_only_rank0_writes(runs):
    out, _ = runs
    for kind in ("ddp", "fsdp"):
        d = out[kind]
        assert sorted(p.name for p in d.iterdir()) == ["ckpt", "config.toml", "metrics.csv", "metrics.jsonl",
                                                        "result.json", "tokenizer"]
        assert [s for s, _ in ckpt_mod.list_checkpoints(d / "ckpt")] == [6, 3]
        assert len((d / "metrics.csv").read_text().splitlines()) == STEPS + 1  # one header, no duplicate rows
        for _, c in ckpt_mod.list_checkpoints(d / "ckpt"):
            ckpt_mod.verify(c)


def test_two_rank_checkpoint_resumes(runs, module_corpus, tmp_path):
    """A 2-rank FSDP2 run 'crashed' after its step-3 checkpoint: resumed on 2 ranks it finishes bit for bit like
    the uninterrupted run; resumed on 1 process (or under DDP) it matches within the tolerance above."""
    out, _ = runs

    def crashed(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(out["fsdp"], d)
        shutil.rmtree(d / "ckpt" / ckpt_mod.step_dir_name(STEPS))
        (d / "result.json").unlink()
        return d

    same = crashed("fsdp2")
    run_world(2, cfg_kw(module_corpus, same, fsdp=True, resume=True))
    wa, wb = final_weights(out["fsdp"]), final_weights(same)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # exact: optimizer moments were gathered and re-sharded losslessly
    assert rows(same) == [{**r, "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"]}
                          for r, s in zip(rows(out["fsdp"]), rows(same))]  # same losses, norms, lrs

    one = crashed("one")
    res = train(TrainConfig(**cfg_kw(module_corpus, one, resume=True)), progress=False)
    assert res.resumed_from_step == 3 and res.steps == STEPS
    for k, v in final_weights(out["one"]).items():
        torch.testing.assert_close(final_weights(one)[k], v, rtol=0, atol=1e-4, msg=k)


def test_fsdp_checkpoints_are_sharded_per_rank(runs, tmp_path, capsys):
    """Under FSDP2 every rank writes its own shard (torch.distributed.checkpoint): no model.safetensors, one
    .distcp file per rank, every file in meta.json's checksums (a flipped byte in a shard is caught), and
    eval / export read the shards back as full tensors equal to the gathered ones."""
    out, _ = runs
    d = ckpt_mod.list_checkpoints(out["fsdp"] / "ckpt")[0][1]
    assert not (d / ckpt_mod.MODEL_FILE).exists() and ckpt_mod.is_sharded(d)
    shards = sorted(p.name for p in (d / "dcp").glob("*.distcp"))
    assert len(shards) == 2  # one per rank
    meta = ckpt_mod.verify(d)
    assert {f"dcp/{s}" for s in shards} | {"dcp/.metadata", "state.pt"} <= set(meta["files"])
    assert "optimizer" not in torch.load(d / "state.pt", weights_only=True)  # the moments live in the shards
    one = weights_mod.read_weights(ckpt_mod.list_checkpoints(out["one"] / "ckpt")[0][1])
    got = weights_mod.read_weights(d)
    assert got.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(got[k], one[k], rtol=0, atol=1e-4, msg=k)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    blob = bytearray((bad / "dcp" / shards[1]).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "dcp" / shards[1]).write_bytes(bytes(blob))
    with pytest.raises(ckpt_mod.CheckpointError, match="does not match its sha256"):
        ckpt_mod.verify(bad)
    assert main(["eval", "--ckpt", str(out["fsdp"]), "--device", "cpu", "--json"]) == 0
    val = json.loads(capsys.readouterr().out)["val_loss"]
    assert val == pytest.approx(json.loads((out["fsdp"] / "result.json").read_text())["final_val_loss"], rel=1e-5)


def test_export_reads_a_sharded_checkpoint(runs, tmp_path):
    pytest.importorskip("transformers")
    from lowbit.export import export

    out, _ = runs
    export(out["fsdp"], tmp_path / "hf")
    from safetensors.torch import load_file

    hf = load_file(tmp_path / "hf" / "model.safetensors")
    full = weights_mod.read_weights(ckpt_mod.list_checkpoints(out["fsdp"] / "ckpt")[0][1])
    assert torch.equal(hf["transformer.wte.weight"], full["transformer.wte.weight"])  # the gathered shards


def test_sharded_checkpoint_resumes_under_ddp(runs, module_corpus, tmp_path):
    """The FSDP2 run's step-3 shards resumed by two DDP ranks (full replicas, resharded on load): the same
    run within the float-rounding tolerance."""
    out, _ = runs
    d = tmp_path / "ddp"
    shutil.copytree(out["fsdp"], d)
    shutil.rmtree(d / "ckpt" / ckpt_mod.step_dir_name(STEPS))
    (d / "result.json").unlink()
    run_world(2, cfg_kw(module_corpus, d, resume=True))
    for a, b in zip(rows(out["fsdp"]), rows(d)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=RTOL), a["step"]
    assert not ckpt_mod.is_sharded(ckpt_mod.list_checkpoints(d / "ckpt")[0][1])  # DDP writes the single file


@pytest.mark.parametrize("name, fsdp", [("mxfp4", True), ("fp4-paper", False), ("fp8-tensor@hardware", True),
                                        ("fp8-rowwise@hardware", False)])
def test_quantized_linears_under_wrappers(module_corpus, tmp_path, monkeypatch, name, fsdp):
    """QLinear's custom autograd Functions under FSDP2 (quantizing the all-gathered fp32 master weight) and DDP,
    the simulated ones and gemm = "hardware" (real FP8 GeMMs through torch._scaled_mm).
    mxfp4's scales are per 32-element tile of each token row (and per 32 tokens for the weight gradient; each rank
    holds 64 whole tokens), so two ranks compute the same GeMMs as one process and must agree like fp32 does,
    with a looser bound because a last-bit difference could flip an FP4 rounding (measured: 1e-7). fp4-paper's OCC
    clamps at quantiles of each rank's own activations, and the FP8 recipes' per-tensor scales (and rowwise's
    per-feature scales over tokens in dW) come from each rank's own tokens: different (legitimate) computations,
    so they are only close (measured on the EPYC: fp4-paper 6e-4, fp8-tensor@hardware 5.6e-3, fp8-rowwise@hardware
    9e-8; on an AMX Xeon 1.2e-3, 1.4e-2, 3e-5; bound 1e-2, 3e-2 for fp8-tensor@hardware: below)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    recipe = fp32_compute(name, tmp_path)
    kw = dict(recipe=recipe, tokens=3 * 2 * 4 * 32, eval_interval=3, ckpt_interval=3)
    one = train(TrainConfig(**cfg_kw(module_corpus, tmp_path / "one", **kw)), progress=False)
    got = run_world(2, cfg_kw(module_corpus, tmp_path / "two", fsdp=fsdp, **kw))
    losses = [r["train_loss"] for r in got]
    assert all(math.isfinite(v) for v in losses) and losses[0] > losses[-1]  # gradients flowed through QLinear
    spread = max(abs(b["train_loss"] - a["train_loss"]) / a["train_loss"] for a, b in zip(one.history, got))
    print(f"{name}: largest relative train-loss difference, 2 ranks vs 1 process: {spread:.1e}")
    # fp8-tensor@hardware: 5.6e-3 on the EPYC, but 1.0e-2 (per-tensor kernel) and 1.4e-2 (per-row kernel, what
    # lowbit now runs on CPUs) on an AMX Xeon: each rank's own per-tensor scales make this a different computation
    # whose distance from the one-process run moves with the CPU's summation order: 3e-2 is twice what was seen
    rel = {"mxfp4": 1e-4, "fp8-tensor@hardware": 3e-2}.get(name, 1e-2)
    for a, b in zip(one.history, got):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=rel)
    assert set(one.quant_stats) <= set(got[-1])  # quantization statistics logged by rank 0 too


def test_batch_must_divide_over_ranks(module_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    args = ["train", "--data", str(module_corpus), "--tokenizer", "bytes", "--batch-size", "3", "--nproc", "2",
            "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "lowbit: error: --batch-size 3 (the global batch) does not divide over --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_helpers_single_process():
    di = dist_mod.info()
    assert (di.rank, di.world_size, di.is_main, di.distributed) == (0, 1, True, False)
    model = torch.nn.Linear(3, 2)
    assert dist_mod.wrap(model, di, torch.device("cpu"), fsdp=True) is model
    assert dist_mod.run_on_main(lambda: 7, di) == 7
    t = torch.tensor([1.5])
    assert dist_mod.all_reduce_sum(t, di) is t and t.item() == 1.5
    from lowbit.cli import _without_nproc

    assert _without_nproc(["train", "--nproc", "2", "--fsdp", "--nproc=4", "--out", "x"]) == \
        ["train", "--fsdp", "--out", "x"]


def test_full_state_dict_keeps_tied_weights_one_tensor(tmp_path):
    from lowbit.models import build_model

    m = build_model("tiny", vocab_size=300, tie_embeddings=True)
    sd = dist_mod.full_state_dict(m)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]  # one tensor: safetensors stores it once
    ckpt_mod.save(tmp_path, 1, sd, {}, {}, keep_last=1)  # the dict form FSDP2 checkpoints take
    m2 = build_model("tiny", vocab_size=300, tie_embeddings=True)
    weights_mod.load_weights(m2, tmp_path / "step_0000001")
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


@pytest.mark.slow
def test_nproc_launcher_ctrl_c_and_resume(module_corpus, tmp_path, monkeypatch):
    """`lowbit train --nproc 2 --fsdp` through the real launcher (torch.distributed.run): Ctrl-C (SIGINT to the
    whole process group, as a terminal sends it; torchrun forwards it again) stops both ranks after a checkpoint
    with exit status 130; resuming finishes the run with the same bits as an uninterrupted 2-rank run."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    steps = 24
    kw = cfg_kw(module_corpus, tmp_path / "run", tokens=steps * 2 * 4 * 32, eval_interval=12, ckpt_interval=1000)
    args = ["train", "--data", kw["data"], "--tokenizer", "bytes", "--tokens", str(kw["tokens"]), "--batch-size", "4",
            "--seq-len", "32", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--device", "cpu",
            "--eval-interval", "12", "--eval-batches", "2", "--log-interval", "1", "--ckpt-interval", "1000",
            "--out", kw["out"], "--no-progress", "--nproc", "2", "--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lowbit", *args], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline and \
            not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 130, err[-3000:]
    (step, d), = ckpt_mod.list_checkpoints(tmp_path / "run" / "ckpt")
    assert 2 <= step < steps and "Traceback" not in err
    assert err.count(f"lowbit: stopped by SIGINT after step {step}; a checkpoint was written") == 1  # rank 0 only
    # resume on 2 ranks (forked, as run_world; the launcher itself was exercised above)
    run_world(2, {**kw, "fsdp": True, "resume": True})
    # the same run uninterrupted (forked ranks, see run_world): the interrupted + resumed one equals it bit for bit
    ref = cfg_kw(module_corpus, tmp_path / "ref", tokens=kw["tokens"], eval_interval=12, ckpt_interval=1000, fsdp=True)
    run_world(2, ref)
    got, want = rows(tmp_path / "run"), rows(tmp_path / "ref")
    assert [g["step"] for g in got] == list(range(1, steps + 1))
    assert [(g["train_loss"], g["val_loss"], g["grad_norm"]) for g in got] == \
        [(w["train_loss"], w["val_loss"], w["grad_norm"]) for w in want]
    wa, wb = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("model, fsdp", [("deepseek-tiny", False), ("deepseek-tiny", True), ("llama4-tiny", False)])
def test_moe_under_ddp_matches_one_process(module_corpus, tmp_path, monkeypatch, model, fsdp):
    """An MoE model on 2 gloo ranks (DDP, or FSDP2 with DCP checkpoints): every expert's weights take part in the
    gradient reduction (an expert a rank's tokens did not choose contributes a zero gradient), and the routers'
    loads are summed over ranks before the balancing bias moves, so both ranks and one process keep the same bias,
    the same measured load and the same losses."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    kw = dict(model=model, grad_accum=1, tokens=4 * 4 * 32)
    single = train(TrainConfig(**cfg_kw(module_corpus, tmp_path / "one", **kw)), progress=False)
    run_world(2, cfg_kw(module_corpus, tmp_path / "two", fsdp=fsdp, **kw))
    a, b = single.history, rows(tmp_path / "two")
    # llama4-tiny: measured 1.3e-5 relative at step 3 (the all-reduce's fp32 summation order, amplified by Adam's
    # first steps at lr 3e-3 more than in deepseek-tiny); 5e-5 there, RTOL elsewhere
    rtol = 5e-5 if model == "llama4-tiny" else RTOL
    for ra, rb in zip(a, b):
        assert rb["moe_load_max_over_mean"] == pytest.approx(ra["moe_load_max_over_mean"], rel=rtol), ra["step"]
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=rtol), ra["step"]
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    bias = [k for k in wa if k.endswith("router.bias")]
    assert bias and all(torch.equal(wa[k], wb[k]) for k in bias)
    moved = any(torch.count_nonzero(wa[k]) for k in bias)
    assert moved == (model == "deepseek-tiny")  # llama4: no balancing bias (γ = 0)
