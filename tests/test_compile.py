"""torch.compile: QLinear (and a converted model) trace as one graph with no graph breaks, compiled numerics
equal eager ones, and a compile failure falls back to eager with a warning instead of crashing.

Graph breaks are counted with `torch._dynamo.explain` (dynamo tracing only, no backend). Numerics run under
backend="aot_eager" (dynamo + AOTAutograd, the same traced forward/backward graphs inductor would get, run
as ATen ops): inductor's C++ code generation takes 30 s+ per graph on this 2-core CPU, too slow for a test,
and what is tested here -- one graph, no breaks, the quantized GeMMs traced correctly -- is decided before
the backend runs. `bench/compile.py` times real inductor runs."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.models import build_model
from lowbit.nn import QLinear
from lowbit.train import TrainConfig, Trainer, train
from lowbit.train.compile import CompiledModel


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _explain(fn, *args):
    e = torch._dynamo.explain(fn)(*args)
    return e.graph_count, e.graph_break_count, [b.reason.splitlines()[0] for b in e.break_reasons]


@pytest.mark.parametrize("recipe", ["fp4-paper", "fp8-block", "fp8-tensor-delayed"])
def test_qlinear_forward_has_no_graph_breaks(recipe):
    # fp4-paper exercises OCC's exact quantiles (CPU eager takes data-dependent shortcuts that would break
    # the graph; under compile the branch-free path runs), DGE and the residual GeMM; delayed scaling the
    # amax-history buffer updates.
    torch.manual_seed(0)
    layer = QLinear(64, 48, recipe=recipe)
    x = torch.randn(2, 64, 64, requires_grad=True)  # 128 tokens: one 128x128 block for fp8-block
    graphs, breaks, reasons = _explain(layer, x)
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.parametrize("recipe", ["nvfp4", "quartet", "nvfp4-4over6"])
def test_random_recipes_are_one_graph(recipe):
    # Stochastic rounding and Quartet's random signs draw from lowbit.rng.Stream: keys from the layer's call-counter
    # buffer by int64 tensor ops, no torch.Generator, so the layer traces as one graph. Bugs caught: the seed
    # made by a torch.Generator again, or the Function mutating a stream made outside it (dynamo: "HOP: Unsafe
    # side effect", a break per layer).
    layer = QLinear(64, 64, recipe=recipe)
    graphs, breaks, reasons = _explain(layer, torch.randn(32, 64, requires_grad=True))
    assert (graphs, breaks) == (1, 0), reasons


def compiled_equals_eager(recipe: str, backend: str, steps: int = 2) -> list[bool]:
    """Per step: whether a compiled QLinear under `recipe` gives eager's output and gradients bit for bit (two
    layers with the same weights, the same inputs), and finally whether both counted the same calls."""
    torch.manual_seed(0)
    eager, comp = QLinear(64, 64, recipe=recipe), QLinear(64, 64, recipe=recipe)
    comp.load_state_dict(eager.state_dict())
    run = torch.compile(comp, backend=backend, fullgraph=True)
    same = []
    for step in range(steps):
        x = torch.randn(48, 64, generator=torch.Generator().manual_seed(step))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), run(xc)
        dy = torch.randn_like(ye)
        ye.backward(dy)
        yc.backward(dy)
        same.append(torch.equal(ye, yc) and torch.equal(xe.grad, xc.grad)
                    and torch.equal(eager.weight.grad, comp.weight.grad))
    return [*same, eager.qstate.calls == comp.qstate.calls == steps]


@pytest.mark.parametrize("recipe", ["nvfp4", "quartet"])
def test_compiled_stochastic_rounding_equals_eager(recipe):
    # The same random numbers compiled and eager: two calls (the counter advances inside the graph), outputs and
    # gradients bit for bit (aot_eager: the traced ops themselves, no code generation that could contract a
    # multiply-add). Bug caught: the call counter frozen at its traced value (the second call would repeat the
    # first's stream), or the compiled path hashing without the key.
    assert compiled_equals_eager(recipe, "aot_eager") == [True, True, True]


def test_converted_gpt_is_one_graph():
    model = lowbit.convert(build_model("tiny", vocab_size=256, n_layer=1, n_embd=64, n_head=2), "fp4-paper")
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    graphs, breaks, reasons = _explain(model, idx, idx)
    assert (graphs, breaks) == (1, 0), reasons


def test_compiled_qlinear_matches_eager():
    torch.manual_seed(0)
    eager = QLinear(64, 32, recipe="fp4-paper")
    comp_layer = QLinear(64, 32, recipe="fp4-paper")
    comp_layer.load_state_dict(eager.state_dict())
    x = torch.randn(40, 64) * torch.linspace(0.1, 5, 64)  # spread magnitudes: OCC clamps some entries
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = eager(xe)
    yc = torch.compile(comp_layer, backend="aot_eager", fullgraph=True)(xc)
    dy = torch.randn_like(ye)
    ye.backward(dy)
    yc.backward(dy)
    # Same quantized operands, same fp32 GeMMs; AOTAutograd's decomposed ops may sum in another order:
    # differences of a few fp32 ulps of |y| ~ 10 (1e-5 absolute), far below one E2M1 step (~25% relative).
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp_layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-5)
    assert ye.abs().max() > 1  # not a vacuous comparison of zeros


@pytest.mark.parametrize("recipe", ["fp8-tensor", "fp8-tensor-delayed", "fp8-block", "mxfp8", "fp4-direct"])
def test_compiled_quantizers_are_the_fused_kernels(recipe, monkeypatch):
    # Under torch.compile every round-to-nearest quantizer is the opaque op lowbit::quantize, which runs the same
    # fused kernels as eager: the compiled step equals the eager one bit for bit (no traced chain for the
    # backend to reorder), and the kernels really ran inside the compiled graph. Bugs caught: the op missing (the
    # kernels never run under compile: count 0), or its fake promising other shapes/dtypes (dynamo errors).
    import lowbit.kernels as K
    calls = []
    real = K.run
    monkeypatch.setattr(K, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    eager = QLinear(128, 128, recipe=recipe)
    comp = QLinear(128, 128, recipe=recipe)
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(128, 128) * torch.linspace(0.1, 5, 128)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # the second call reads delayed scaling's amax history
        ye = eager(xe)
        yc = torch.compile(comp, backend="aot_eager", fullgraph=True)(xc)
        dy = torch.randn_like(ye)
        ye.backward(dy)
        yc.backward(dy)
    n_eager = len(calls)
    assert n_eager > 0
    for a, b in ((ye, yc), (xe.grad, xc.grad), (eager.weight.grad, comp.weight.grad)):
        assert torch.equal(a, b)
    calls.clear()
    yc = torch.compile(comp, backend="aot_eager", fullgraph=True)(xc)
    yc.backward(dy)
    assert len(calls) > 0  # the compiled step called the fused kernels


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found")


def test_compile_failure_falls_back_to_eager_with_a_warning(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    lowbit.convert(model, "fp4-paper")
    x = torch.randn(4, 16)
    expected = model(x)
    wrapped = CompiledModel(model, backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        out = wrapped(x)
    assert torch.equal(out, expected)
    assert wrapped.failed is not None and "no C++ compiler found" in wrapped.failed
    assert any("torch.compile failed" in r.getMessage() and "eagerly" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert torch.equal(wrapped(x), expected)  # later calls: eager, no second warning
    assert not caplog.records


def test_backward_compile_failure_is_caught_at_the_forward(caplog):
    # AOTAutograd normally compiles the backward lazily, inside loss.backward(), where no fallback is
    # possible; CompiledModel forces it to compile with the forward.
    from torch._dynamo.backends.common import aot_autograd

    def bw_fails(gm, example_inputs):
        raise RuntimeError("backward codegen failed")

    backend = aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=bw_fails)
    model = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    wrapped = CompiledModel(model, backend=backend)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        wrapped(x).sum().backward()  # eager after the fallback: backward works
    assert "backward codegen failed" in wrapped.failed
    assert model.weight.grad is not None


@pytest.mark.slow  # ~25 s: dynamo traces the 4-layer model's forward and backward
def test_train_with_compile_runs_and_matches_eager(tmp_path, monkeypatch):
    # The trainer's --compile path end to end (aot_eager for speed, see the module docstring): same losses
    # as the eager run up to float reassociation.
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["ab", "cd", "ef", "gh"]) for _ in range(12))
                                for _ in range(400)))
    class AotEager(Trainer):
        def compile(self, model):
            return CompiledModel(model, backend="aot_eager")

    torch.set_num_threads(1)
    common = dict(model="tiny", recipe="fp4-paper", data=str(corpus), tokenizer="bytes", tokens=4 * 4 * 32,
                  batch_size=4, seq_len=32, device="cpu", val_fraction=0.0, log_interval=1)
    eager = train(TrainConfig(out=str(tmp_path / "e"), **common), progress=False)
    comp = train(TrainConfig(out=str(tmp_path / "c"), compile=True, **common), progress=False, trainer=AotEager)
    le = [r["train_loss"] for r in eager.history]
    lc = [r["train_loss"] for r in comp.history]
    assert len(le) == len(lc) == 4
    # fp32 master weights, bf16 GeMMs: a reassociated sum can flip one bf16 rounding, which FP4 quantization
    # may amplify to one E2M1 step on a few entries; over 4 steps the loss moves by far less than 1e-2.
    assert max(abs(a - b) for a, b in zip(le, lc)) < 1e-2
    assert le[-1] < le[0]  # it trained


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    # --compile-mode reduce-overhead (CUDA graphs, for launch-bound GPU steps) is passed to torch.compile; the
    # default passes no mode; a bad mode is one line naming the choices. Bug caught: the option parsed and dropped.
    import lowbit.train.compile as tc
    seen = []
    monkeypatch.setattr(tc, "compile_model", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("ab cd ef gh " * 400)
    common = dict(model="tiny", recipe="bf16", data=str(corpus), tokenizer="bytes", tokens=2 * 4 * 32, batch_size=4,
                  seq_len=32, device="cpu", val_fraction=0.0, compile=True)
    train(TrainConfig(out=str(tmp_path / "a"), compile_mode="reduce-overhead", **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), **common), progress=False)
    assert seen == [{"mode": "reduce-overhead"}, {}]
    with pytest.raises(ValueError, match="compile_mode 'fast' is not one of default, reduce-overhead, max-autotune"):
        TrainConfig(compile_mode="fast")


def test_compile_without_the_custom_op_traces_the_eager_quantizers(monkeypatch):
    # Where torch cannot register lowbit::quantize (quant._QUANTIZE_OP is None), compiled code traces the eager
    # quantizer instead: it still compiles as one graph and matches eager (up to the backend's reassociation of
    # the fp32 GeMMs, as in test_compiled_qlinear_matches_eager). Bug caught: the fallback calling a missing op.
    from lowbit import quant
    monkeypatch.setattr(quant, "_QUANTIZE_OP", None)
    torch.manual_seed(0)
    eager = QLinear(64, 32, recipe="fp8-tensor")
    comp = QLinear(64, 32, recipe="fp8-tensor")
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(40, 64)
    ye = eager(x)
    yc = torch.compile(comp, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    assert ye.abs().max() > 0.1


def test_compiled_steps_hold_no_statistics_and_sampled_steps_run_eagerly(tmp_path, monkeypatch):
    # Under --compile a step that samples statistics runs the eager model; the compiled model never runs with
    # statistics on (under CUDA graphs their tensors were overwritten by the next replay: a crash on the H200).
    # The records equal an eager run's. Bugs caught: every step through the compiled model (stats inside its
    # graph); statistics left on for every step under --compile (the old rule).
    from lowbit.train.qstats import read
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_text("ab cd ef gh " * 400)
    seen = []

    class Spy(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *a):
            seen.append(any(m.qstate.collect for m in self.model.modules() if isinstance(m, QLinear)))
            return self.model(*a)

    class SpyTrainer(Trainer):
        def compile(self, model):
            return Spy(model)

    common = dict(model="tiny", recipe="fp8-tensor", data=str(tmp_path / "c.txt"), tokenizer="bytes",
                  tokens=4 * 4 * 32, batch_size=4, seq_len=32, device="cpu", val_fraction=0.0, log_interval=2)
    train(TrainConfig(out=str(tmp_path / "c"), compile=True, **common), progress=False, trainer=SpyTrainer)
    train(TrainConfig(out=str(tmp_path / "e"), **common), progress=False)
    assert seen == [False, False]  # steps 1 and 3; steps 2 and 4 sampled, eagerly
    comp, eager = read(tmp_path / "c"), read(tmp_path / "e")
    assert sorted({r["step"] for r in comp}) == [2, 4] and comp == eager


def _raise_from(filename: str, exc: Exception):
    """A function that raises exc from a frame whose code lives in `filename` (as torch's compiler's would)."""
    ns: dict = {}
    exec(compile("def f(*a, **k):\n    raise EXC\n", filename, "exec"), {"EXC": exc}, ns)
    return ns["f"]


def test_compiler_internal_assert_falls_back_and_model_errors_still_raise(caplog):
    # dynamo's "Global autocast(cpu)_enabled state changed while dynamo tracing" is a plain AssertionError from
    # torch/_dynamo: it crashed `lowbit train --compile` (fp4-paper on CPU). It now falls back like any compile
    # failure; an error of the model's own still raises. Bugs caught: only TorchDynamoException caught (the crash);
    # every exception swallowed (a model's bug hidden behind a silent eager re-run).
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    wrapped = CompiledModel(model, backend="eager")
    wrapped.__dict__["_compiled"] = _raise_from("/x/torch/_dynamo/convert_frame.py",
                                                AssertionError("Global autocast state changed"))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert torch.equal(wrapped(x), model(x))
    assert "Global autocast state changed" in wrapped.failed
    wrapped = CompiledModel(model, backend="eager")
    wrapped.__dict__["_compiled"] = _raise_from("/x/lowbit/models/gpt.py", AssertionError("a model bug"))
    with pytest.raises(AssertionError, match="a model bug"):
        wrapped(x)
    assert wrapped.failed is None


@pytest.mark.parametrize("recipe", ["fp4-paper", "fp4-direct", "fp8-tensor"])
def test_bf16_autocast_step_traces_as_one_graph(recipe):
    # A CPU bf16 step traces with no graph break: the CPU GeMM path (read from /proc/cpuinfo on first use) is a
    # constant to dynamo. Bug caught: cpu_gemm_path traced (`open` breaks the graph inside every QLinear's
    # autograd Function, which then runs eagerly; with autocast on, dynamo's autocast assert crashed the run).
    from lowbit import cpu_bf16
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cpu_bf16, "_PATH", {})  # first use inside the trace
    torch.manual_seed(0)
    model = lowbit.convert(build_model("tiny"), recipe)
    x = torch.randint(0, 100, (2, 32))

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, x)[1]
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(step)(x)
    finally:
        monkeypatch.undo()
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("recipe", ["fp4-paper", "fp4-direct", "nvfp4", "quartet"])
def test_recipe_compiles_forward_and_backward_under_autocast(recipe):
    # fp4-paper's DGE backward under --compile: a CPU kernel's gate asked dw.is_contiguous() before asking whether
    # dynamo was tracing, which (strides unknown in a traced backward) tripped dynamo's "Global autocast state
    # changed" assert: every fp4-paper --compile run fell back to eager (or crashed, before the fallback caught
    # it). Bug caught: the tracing test not first in kernels.dge_apply's gate; for nvfp4 and quartet,
    # hadamard.rotate asking a.stride() (which layout to rotate in) before whether dynamo is tracing.
    from lowbit.train.runtime import autocast
    torch.manual_seed(0)
    model = lowbit.convert(build_model("tiny"), recipe)
    wrapped = CompiledModel(model, backend="aot_eager")
    x = torch.randint(0, 100, (2, 32))
    with autocast(lowbit.recipes.get(recipe), torch.device("cpu")):
        _, loss = wrapped(x, x)
    loss.backward()
    assert wrapped.failed is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


INDUCTOR_SR = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_compile import compiled_equals_eager
for recipe in ("nvfp4", "quartet"):
    print(recipe, *compiled_equals_eager(recipe, "inductor"))
"""


@pytest.mark.slow
def test_inductor_compiles_stochastic_rounding_bit_for_bit(tmp_path):
    # Inductor's generated C++ for the random streams (int64 SplitMix64, int32 hashing) equals eager, and does not
    # crash (in a subprocess: a miscompiled kernel segfaults). Bugs caught, both seen with torch 2.13's inductor:
    # the call counter masked to 32 bits before the sum (integer range analysis then miscompiled the seed: every
    # SR gradient differed), and Quartet's ±1 signs as an int64 select (the vectorised kernel segfaulted).
    import subprocess
    import sys
    script = tmp_path / "inductor_sr.py"
    script.write_text(INDUCTOR_SR)
    r = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["nvfp4", "True", "True", "True", "quartet", "True", "True", "True"], r.stdout


@pytest.mark.parametrize("granularity,block", [("row", 0), ("tile", 16), ("tensor", 0)])
def test_quantize_op_fake_matches_real_for_transposed_operands(granularity, block):
    """torch.library.opcheck of lowbit::quantize (fake vs real: shapes, strides, dtypes; schema) with an operand
    passed transposed (b standing for b.t(), values back in b's layout) and plainly; the transposed call's values
    are fake_quantize(b.t()) transposed, bit for bit. Bugs caught: the fake giving the scales of b instead of
    b.t(), the real op returning a non-contiguous (copied) or untransposed result."""
    from lowbit.quant import fake_quantize, fake_quantize_with_scales
    from lowbit.tensor_quant import TensorQuant

    q = TensorQuant("e2m1", granularity, block)
    b = torch.randn(48, 32).bfloat16()
    for transposed in (True, False):
        args = (b, q.fmt, q.granularity, q.block, q.scale_fmt, q.scale_round, q.reciprocal, q.scale_rule,
                q.scale_mult, None, True, "nearest", False, None, 0, [], transposed)
        torch.library.opcheck(torch.ops.lowbit.quantize.default, args)
    out, scales = fake_quantize_with_scales(b, q, transposed=True)
    assert torch.equal(out.t(), fake_quantize(b.t(), q)) and out.shape == b.shape
    real = torch.ops.lowbit.quantize(b, q.fmt, q.granularity, q.block, q.scale_fmt, q.scale_round, q.reciprocal,
                                     q.scale_rule, q.scale_mult, None, True, "nearest", False, None, 0, [], True)
    assert real[0].is_contiguous() and torch.equal(real[0], out) and real[1].shape == scales.shape


def test_compiled_occ_runs_the_sparse_kernels_bit_for_bit(monkeypatch):
    """Under torch.compile fp4-paper's per-token OCC, ΔX·Wᵀ and dYᵀ·ΔX are the opaque ops lowbit::occ_sparse,
    ell_mm and ell_tmm (rows of a fixed width), and DGE's epilogue lowbit::dge_epilogue: the C kernels run inside
    the graph and the compiled step equals the eager one bit for bit (Y, dX, dW). Bugs caught: the compiled path
    falling back to a dense ΔX or a traced epilogue (kernel counts stay put), a fake promising another width or
    dtype (dynamo errors), a fixed width that drops a finite row's entries (values differ)."""
    from lowbit.kernels import dge as dge_kernels
    from lowbit.kernels import occ as occ_kernels
    calls = {"occ": 0, "mm": 0, "tmm": 0, "dge": 0}

    def counting(name, real):
        def run(*a, **k):
            out = real(*a, **k)
            calls[name] += out is not None  # the kernel ran (a traced call returns None)
            return out
        return run
    for mod, name, attr in ((occ_kernels, "occ", "occ_rows"), (occ_kernels, "mm", "ell_mm"),
                            (occ_kernels, "tmm", "ell_tmm"), (dge_kernels, "dge", "dge_epilogue")):
        monkeypatch.setattr(mod, attr, counting(name, getattr(mod, attr)))
    torch.manual_seed(0)
    eager, comp = QLinear(128, 96, recipe="fp4-paper"), QLinear(128, 96, recipe="fp4-paper")
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(64, 128) * torch.linspace(0.1, 5, 128)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = eager(xe)
    before = dict(calls)
    yc = torch.compile(comp, backend="aot_eager", fullgraph=True)(xc)
    dy = torch.randn_like(ye)
    ye.backward(dy)
    yc.backward(dy)
    assert all(calls[n] > before[n] for n in ("occ", "mm")) and calls["tmm"] >= 2 and calls["dge"] >= 2
    for a, b in ((ye, yc), (xe.grad, xc.grad), (eager.weight.grad, comp.weight.grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", ["quartet", "fp4-paper", "nvfp4"])
def test_first_compiled_call_does_not_load_the_kernels_inside_the_graph(recipe, monkeypatch):
    """A trainer compiles before any eager step, so the kernel library can be first asked for while dynamo traces:
    that must not break the graph (the loader takes a lock dynamo cannot trace; a break in the model's block loop
    made dynamo skip the whole frame and run it eagerly). Bug caught: a kernel wrapper asking for the library
    before asking whether dynamo is tracing (quartet's trust mask did: compiled quartet ran 0.85x eager)."""
    from lowbit.kernels import cpu
    torch.manual_seed(0)
    layer = QLinear(64, 64, recipe=recipe)
    monkeypatch.setattr(cpu, "_LIB", [])  # not loaded yet in this process (as on a trainer's first step)
    graphs, breaks, reasons = _explain(layer, torch.randn(64, 64, requires_grad=True))
    assert (graphs, breaks) == (1, 0), reasons
