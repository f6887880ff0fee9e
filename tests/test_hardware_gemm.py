"""gemm = "hardware" (lowbit.nn.hardware): the three GeMMs on FP8 codes through torch._scaled_mm, against the
gemm = "exact" simulation of the same recipe (same quantizer, same codes; only the accumulation order may differ),
and the recipes it refuses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit import recipes
from lowbit.nn import QLinear
from lowbit.nn.hardware import HardwareLinearFunction, scaled_mm

RECIPES = ["fp8-tensor", "fp8-tensor-delayed", "fp8-rowwise", "fp8-rowwise-gw-hp"]


def run(name: str, gemm: str, compute: str, calls: int = 2, seed: int = 0):
    r = dataclasses.replace(recipes.get(name), gemm=gemm, compute_dtype=compute, name=f"{name}-{gemm}")
    torch.manual_seed(seed)
    q = QLinear.from_linear(torch.nn.Linear(64, 48), r)
    x = torch.randn(32, 64, requires_grad=True)
    g = torch.randn(32, 48) * torch.linspace(0.01, 3, 48)  # columns of different scales: rowwise matters
    for _ in range(calls):  # the second call reads delayed scaling's amax history
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            y = q(x)
        y.float().backward(g)
    return y.detach().float(), x.grad.clone(), q.weight.grad.clone(), q.bias.grad.clone()


@pytest.mark.parametrize("name", RECIPES)
def test_hardware_equals_the_exact_simulation(name, monkeypatch):
    # fp32 compute: Y, dX, dW, db equal to the simulation's up to summation order (rtol 1e-6; on this CPU they
    # are bitwise equal), and torch._scaled_mm really ran the GeMMs (3 per call, 2 with the weight gradient in
    # high precision). Bug caught: one scale used for all of B's rows (the columns of g differ 300x: checked), or
    # delayed scaling's amax not used.
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    hw = run(name, "hardware", "fp32")
    assert len(calls) == 2 * (2 if name == "fp8-rowwise-gw-hp" else 3)
    for a, b in zip(run(name, "exact", "fp32"), hw):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fp8-tensor", "fp8-rowwise"])
def test_bf16_output_within_one_bf16_step(name):
    # bf16 compute: the fp32 GeMM result is rounded to bf16 once in both paths; a different accumulation order can
    # put a value on the other side of a rounding boundary, so Y may differ by one bf16 step (at most 2^-7 of the
    # value: bf16 keeps 8 significant bits); the gradients (fp32) as in fp32.
    e, h = run(name, "exact", "bf16"), run(name, "hardware", "bf16")
    assert ((e[0] - h[0]).abs() <= e[0].abs() * 2.0 ** -7).all()
    assert (e[0] != h[0]).float().mean() < 0.05  # a few boundary cases, not a different computation
    for a, b in zip(e[1:], h[1:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_scaled_mm_by_hand_and_empty():
    # rowwise by hand: codes of a = a / s_row (exact: powers of two times FP8 values), product = codes·codesᵀ·s·s
    q = recipes.get("fp8-rowwise").input
    a = torch.tensor([[1.0, 2.0], [0.5, -0.25]])
    b = torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(scaled_mm(a, q, b, q, torch.float32), a @ b.t())  # representable: exact
    assert scaled_mm(torch.zeros(0, 8), q, torch.randn(4, 8), q, torch.float32).shape == (0, 4)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp8", "fp4-paper", "quartet"])
def test_recipes_the_fp8_gemm_cannot_run_are_refused(name):
    with pytest.raises(ValueError, match="gemm='rounded'"):
        dataclasses.replace(recipes.get(name), gemm="hardware")


def test_name_at_mode_selects_the_gemm():
    # "NAME@MODE" (what `--recipes bf16,fp8-tensor,fp8-tensor@hardware` puts side by side). Bug caught: the suffix
    # ignored (the label says hardware, the run simulates) or a bad mode accepted.
    r = recipes.get("fp8-tensor@hardware")
    assert (r.name, r.gemm) == ("fp8-tensor@hardware", "hardware")
    assert dataclasses.replace(r, name="x", gemm="rounded") == dataclasses.replace(recipes.get("fp8-tensor"), name="x")
    with pytest.raises(ValueError, match="choose one of rounded, exact, hardware"):
        recipes.get("fp8-tensor@fast")
    with pytest.raises(ValueError, match="gemm='rounded'"):
        recipes.get("nvfp4@hardware")


def test_trains_through_the_trainer(tmp_path, monkeypatch):
    from conftest import write_corpus
    from lowbit import flops
    from lowbit.models import get_config
    from lowbit.train import TrainConfig, train

    # MFU of a hardware run is taken against the FP8 GeMM's peak, not bf16's (bug caught: the bf16 peak kept)
    monkeypatch.setattr(flops, "measure_cpu_fp8_flops", lambda: 3e9)
    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda dtype=torch.float32: 5e9)
    corpus = write_corpus(tmp_path, "kings")
    res = train(TrainConfig(model="llama-nano", recipe="fp8-rowwise@hardware", data=str(corpus),
                            tokenizer="bytes", tokens=3 * 4 * 32, batch_size=4, seq_len=32, device="cpu",
                            eval_batches=1, out=str(tmp_path / "run")), progress=False)
    assert res.final_val_loss == res.final_val_loss and HardwareLinearFunction is not None
    fpt = flops.flops_per_token(get_config("llama-nano", vocab_size=257), 32)["train"]
    assert res.mfu == pytest.approx(res.tokens_per_s * fpt / 3e9, rel=1e-9)
