"""gemm = "hardware" (lowbit.nn.hardware): the three GeMMs on FP8 codes through torch._scaled_mm, against the
gemm = "exact" simulation of the same recipe (same quantizer, same codes; only the accumulation order may differ),
and the recipes it refuses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit import recipes
from lowbit.nn import LinearSpec, QLinear
from lowbit.nn.hardware import HardwareLinearFunction, scaled_mm

RECIPES = ["fp8-tensor", "fp8-tensor-delayed", "fp8-rowwise", "fp8-rowwise-gw-hp"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def cpu_rowwise(name: str) -> None:
    """Skip where this torch's CPU _scaled_mm has no per-row scales (torch < 2.13) and the recipe needs them."""
    from lowbit.nn import hardware
    if "rowwise" in name and not hardware.cpu_rowwise():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only (rowwise: torch 2.13)")


def inputs(shape: tuple[int, int, int], seed: int, device: str):
    """(nn.Linear [in -> out], X [tokens, in], dY [tokens, out]); dY's columns differ in scale (rowwise matters)."""
    tokens, d_in, d_out = shape
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in, device=device)
    g = torch.randn(tokens, d_out, device=device) * torch.linspace(0.01, 3, d_out, device=device)
    return lin, x, g


def run(name: str, gemm: str, compute: str, calls: int = 2, seed: int = 0, device: str = "cpu",
        shape: tuple[int, int, int] = (32, 64, 48)):
    """Two forward/backward calls of one QLinear [in -> out] on `tokens` rows: (Y, dX, dW, db) of the last."""
    r = dataclasses.replace(recipes.get(name), gemm=gemm, compute_dtype=compute, name=f"{name}-{gemm}")
    lin, x, g = inputs(shape, seed, device)
    q = QLinear.from_linear(lin, r).to(device)
    x.requires_grad_(True)
    for _ in range(calls):  # the second call reads delayed scaling's amax history
        with torch.autocast(device, dtype=torch.bfloat16, enabled=compute == "bf16"):
            y = q(x)
        y.float().backward(g)
    return y.detach().float(), x.grad.clone(), q.weight.grad.clone(), q.bias.grad.clone()


def order_bounds(shape, seed: int = 0, compute: str = "fp32") -> list[torch.Tensor]:
    """Per-element bounds on |hardware − exact| for (Y, dX, dW, db) when the two differ only in how each fp32 dot
    product of K terms is summed (and where the scales are applied): each result is within (K + 2)·2^-24 of
    Σ|aₖbₖ| of the exact one, so two of them within twice that; |Q(a)| <= |a|·(1 + 2^-4) for E4M3 codes rounded
    to nearest (half a step of 3 mantissa bits), times (1 + 2^-8) for bf16 compute's rounding of the operands.
    db is one fp32 sum in both paths: equal."""
    tokens, d_in, d_out = shape
    lin, x, g = inputs(shape, seed, "cpu")
    w, q = lin.weight.detach().abs(), ((1 + 2.0 ** -4) * (1 + 2.0 ** -8 if compute == "bf16" else 1)) ** 2

    def bound(a_abs, b_abs, k):
        return 2 * (k + 2) * 2.0 ** -24 * q * (a_abs @ b_abs)
    return [bound(x.abs(), w.t(), d_in), bound(g.abs(), w, d_out), bound(g.abs().t(), x.abs(), tokens),
            torch.zeros(d_out)]


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (got.double() - ref.double()).abs() - bound.double()
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} elements past the summation-order bound"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", RECIPES)
def test_hardware_equals_the_exact_simulation(name, monkeypatch):
    # fp32 compute: Y, dX, dW, db equal to the simulation's up to summation order (order_bounds; on the 2-core
    # EPYC they are bitwise equal, on a Xeon's oneDNN 3 of 1536 differ by up to 4.6e-5 relative), and
    # torch._scaled_mm really ran the GeMMs (3 per call, 2 with the weight gradient in high precision). Bug caught:
    # one scale used for all of B's rows (the columns of g differ 300x: checked), or delayed scaling's amax unused.
    cpu_rowwise(name)
    from lowbit.nn import hardware
    hardware.cpu_rowwise()  # the once-per-process probe of torch's CPU kernel calls _scaled_mm itself: not counted below
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    hw = run(name, "hardware", "fp32")
    assert len(calls) == 2 * (2 if name == "fp8-rowwise-gw-hp" else 3)
    for a, b, bound in zip(run(name, "exact", "fp32"), hw, order_bounds((32, 64, 48))):
        assert_within(b, a, bound)


@pytest.mark.parametrize("name,quantized", [("fp8-tensor", 3), ("fp8-tensor-delayed", 4), ("fp8-rowwise", 6)])
def test_tensorwise_operands_quantized_once(name, quantized, monkeypatch):
    # One scale per tensor: Q(Xᵀ) = Q(X)ᵀ, so the backward transposes the forward's FP8 codes instead of
    # quantizing X, W and dY a second time (3 quantizations per call instead of 6; delayed scaling re-reads X's
    # history in the backward, so X is quantized again: 4); the numbers are the ones the other tests pin to the
    # exact simulation. Bug caught: the reuse switched off, or applied to row scales.
    from lowbit.nn import hardware
    cpu_rowwise(name)
    calls = []
    real = hardware._operand
    monkeypatch.setattr(hardware, "_operand", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(name, "hardware", "fp32", calls=1)
    assert len(calls) == quantized


@CUDA
@pytest.mark.parametrize("name", RECIPES + ["fp8-block"])
def test_hardware_on_the_gpu_equals_the_exact_simulation(name):
    # The FP8 tensor cores against the exact simulation on the same GPU. Tolerance: Hopper's FP8 MMA keeps fewer
    # bits than fp32 in its partial sums between cuBLAS's promotions to fp32 (DeepSeek-V3 §3.3.2: about 14 bits),
    # so the outputs differ by ~2^-13 in norm (measured on an H200: 1.17e-4 for every tensor/row recipe), not
    # by summation order alone; 5e-4 leaves 4x headroom, and a wrong scale or layout is off by O(1) (128x128
    # block scales with 3 blocks per row, unpadded, measured 1.8e2). Shapes: multiples of 128, as the
    # block-scaled GeMM needs.
    if name == "fp8-block" and not hopper():
        pytest.skip("block-scaled FP8 GeMMs run on Hopper (SM90) only")
    shape = (256, 384, 256)
    for a, b in zip(run(name, "exact", "fp32", device="cuda", shape=shape),
                    run(name, "hardware", "fp32", device="cuda", shape=shape)):
        err = rel_err(b, a)
        print(f"{name}: relative error {err:.2e}")
        assert err < 5e-4


def _emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm as its CUDA tests define it for block scales (an independent reference): a [M, K] row-major,
    b [K, N] column-major; each scale tensor is a grid over its operand ([] one, [M, 1] per row, [M, K/128] 1x128
    tiles stored outer-dim-major, [M/128, K/128] blocks; b's the same over [K, N]); every FP8 code times the scale
    of its cell, then an fp32 product."""
    M, K = a.shape
    N = b.shape[1]
    assert b.stride(0) == 1, "b must be column-major"
    if scale_a.dim() == 2 and scale_a.shape == (M, K // 128) and K > 128:
        assert scale_a.stride() == (1, M), "1x128 scales of the first operand are read outer-dim-major"

    def grid(s, rows, cols):
        if s.dim() == 0:
            return s.expand(rows, cols)
        return s.repeat_interleave(rows // s.shape[0], 0).repeat_interleave(cols // s.shape[1], 1)
    return ((a.float() * grid(scale_a, M, K)) @ (b.float() * grid(scale_b, K, N))).to(out_dtype)


def test_block_scaled_layouts_as_torch_reads_them(monkeypatch):
    # fp8-block on hardware with torch._scaled_mm replaced by an emulation of its block-scaled semantics (the CPU
    # _scaled_mm has none): every GeMM's codes and scales, laid out as the CUDA kernel reads them, give the exact
    # simulation's Y, dX, dW, db (the same fp32 products: bitwise on this CPU; rtol 1e-6 for the summation order).
    # Bugs caught: b's scales not transposed with b, tile scales row-major, a 128x128 block's scale not given
    # to each of its 128 rows, dgrad's Wᵀ blocks taken from W's grid untransposed.
    from lowbit.nn import hardware
    monkeypatch.setattr(hardware, "check_device", lambda device, spec: None)
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    shape = (256, 384, 256)
    for a, b in zip(run("fp8-block", "exact", "fp32", shape=shape),
                    run("fp8-block", "hardware", "fp32", shape=shape)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_cpu_rowwise_refused_where_torch_lacks_it(monkeypatch):
    # torch 2.11's CPU _scaled_mm asserts per-tensor scales (seen on the H200 machine's torch): one line naming the
    # torch that has it, not torch's internal assert (bug caught: the probe's answer ignored)
    from lowbit.nn import hardware
    monkeypatch.setattr(hardware, "_CPU_ROWWISE", [False])
    with pytest.raises(ValueError, match=r"rowwise FP8 GeMMs on a CPU need torch >= 2.13.*use gemm='rounded'"):
        run("fp8-rowwise", "hardware", "fp32", calls=1)
    run("fp8-tensor", "hardware", "fp32", calls=1)  # tensorwise runs on every torch


def test_block_scaled_gemm_refused_off_hopper():
    # one line naming the need and the fix, at the first forward (bug caught: the CPU _scaled_mm called with
    # block scales, failing deep in torch with a message about scale shapes)
    with pytest.raises(ValueError, match=r"fp8-block\) need a Hopper GPU \(SM90\).*this is a CPU with torch "
                                         r".*: use gemm='rounded'"):
        run("fp8-block", "hardware", "fp32", calls=1, shape=(128, 128, 128))


@pytest.mark.parametrize("name", ["fp8-tensor", "fp8-rowwise", "fp8-rowwise-gw-hp"])
def test_bf16_output_within_one_bf16_step(name):
    # bf16 compute: the fp32 GeMM result is rounded to bf16 once in both paths; a different accumulation order can
    # put a value on the other side of a rounding boundary, so Y may differ by one bf16 step (at most 2^-7 of the
    # value: bf16 keeps 8 significant bits); the gradients (fp32) as in fp32.
    # gw-hp's weight gradient is a plain bf16 GeMM on hardware (torchao's rowwise_with_gw_hp), which is what
    # the "rounded" simulation computes, not "exact"'s fp32 product: equal to the former bit for bit.
    cpu_rowwise(name)
    e, h = run(name, "exact", "bf16"), run(name, "hardware", "bf16")
    assert ((e[0] - h[0]).abs() <= e[0].abs() * 2.0 ** -7).all()
    assert (e[0] != h[0]).float().mean() < 0.05  # a few boundary cases, not a different computation
    bounds = order_bounds((32, 64, 48), compute="bf16")
    if name == "fp8-rowwise-gw-hp":
        assert torch.equal(h[2], run(name, "rounded", "bf16")[2])  # bug caught: dW as an fp32 GeMM (slow on GPUs)
        e, h, bounds = e[:2] + e[3:], h[:2] + h[3:], bounds[:2] + bounds[3:]
    for a, b, bound in zip(e[1:], h[1:], bounds[1:]):
        assert_within(b, a, bound)


def test_scaled_mm_by_hand_and_empty():
    cpu_rowwise("rowwise")
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


def test_block_scales_other_than_128_refused():
    # cuBLAS's block-scaled FP8 GeMM takes 1x128 and 128x128 only (bug caught: any tile size let through)
    r = recipes.get("fp8-block")
    with pytest.raises(ValueError, match="e4m3/tile64/nearest: use gemm='rounded'"):
        dataclasses.replace(r, input=dataclasses.replace(r.input, block=64), gemm="hardware")


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
    res = train(TrainConfig(model="llama-nano", recipe="fp8-tensor@hardware", data=str(corpus),
                            tokenizer="bytes", tokens=3 * 4 * 32, batch_size=4, seq_len=32, device="cpu",
                            eval_batches=1, out=str(tmp_path / "run")), progress=False)
    assert res.final_val_loss == res.final_val_loss and HardwareLinearFunction is not None
    fpt = flops.flops_per_token(get_config("llama-nano", vocab_size=257), 32)["train"]
    assert res.mfu == pytest.approx(res.tokens_per_s * fpt / 3e9, rel=1e-9)


def test_gpu_generations_refused_in_one_line(monkeypatch):
    # What each CUDA generation lacks, decided from its capability (no GPU needed): rowwise scales off Hopper
    # (torch's SM89 and SM100 rowwise kernel writes bf16 only; SM90 goes through cuBLAS), block scales off Hopper,
    # anything below SM89. Bug caught: an SM89 rowwise run failing inside torch instead of this line.
    from lowbit.nn.hardware import check_device
    from lowbit.nn.spec import LinearSpec
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    spec = {n: LinearSpec.from_recipe(recipes.get(n)) for n in ("fp8-tensor", "fp8-rowwise", "fp8-block")}
    cuda = torch.device("cuda")
    for cap, ok in (((8, 0), ()), ((8, 9), ("fp8-tensor",)), ((9, 0), ("fp8-tensor", "fp8-rowwise", "fp8-block")),
                    ((10, 0), ("fp8-tensor",))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        for name, sp in spec.items():
            if name in ok:
                check_device(cuda, sp)
            else:
                with pytest.raises(ValueError, match="gemm='rounded'"):
                    check_device(cuda, sp)


def test_device_check_once_per_gpu_and_never_inside_a_compiled_graph(monkeypatch):
    # A layer's call checks its CUDA device once per scale kind (the device queries cost host time at every call:
    # the H200's steps were host-bound), and not while torch.compile traces (there it broke the graph at every
    # layer: no CUDA-graph speed-up on the H200). Bugs caught: no memo; the check traced.
    from lowbit.nn import hardware
    from lowbit.nn.spec import LinearSpec
    queries = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: queries.append(1) or (9, 0))
    monkeypatch.setattr(hardware, "_CHECKED", set())
    spec, cuda = LinearSpec.from_recipe(recipes.get("fp8-tensor")), torch.device("cuda", 0)
    for _ in range(3):
        hardware.check_once(cuda, spec)
    assert len(queries) == 1
    monkeypatch.setattr(hardware, "_CHECKED", set())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    hardware.check_once(cuda, spec)
    assert len(queries) == 1


def test_trainer_refuses_a_device_before_the_first_step(tmp_path, monkeypatch):
    # gemm=hardware on a device without the GeMM: the trainer's setup names it (so a compiled model, whose traced
    # layers skip the check, still gets the one line). Bug caught: check_model not called by the trainer.
    from lowbit.nn import hardware
    from lowbit.train import TrainConfig, Trainer
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "check_once", lambda device, spec: None)  # only the setup's check remains
    (tmp_path / "c.txt").write_text("ab cd ef gh " * 400)
    with pytest.raises(ValueError, match=r"fp8-block\) need a Hopper GPU.*use gemm='rounded'"):
        Trainer(TrainConfig(model="tiny", recipe="fp8-block@hardware", data=str(tmp_path / "c.txt"),
                            tokenizer="bytes", tokens=4 * 32, batch_size=4, seq_len=32, device="cpu",
                            val_fraction=0.0, out=str(tmp_path / "r")))


@pytest.mark.parametrize("bias", [False, True])
def test_gemms_write_the_compute_dtype_directly(monkeypatch, bias):
    # bf16 compute: Y's FP8 GeMM writes bf16 itself (one rounding of the fp32 result, as fp32-then-cast: checked
    # equal on this CPU for tensorwise and rowwise), saving an fp32 [M, N] pass, and adds the bias (in bf16, as
    # the simulation rounds it) in its epilogue. dX and dW are written in their parameters' dtype (fp32 here).
    # Bug caught: the bias added again after the GeMM, or added to a bf16 Y (a second rounding).
    seen = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, out_dtype, **k: seen.append(
        (out_dtype, None if k.get("bias") is None else k["bias"].dtype)) or real(*a, out_dtype=out_dtype, **k))
    r = dataclasses.replace(recipes.get("fp8-tensor"), gemm="hardware", compute_dtype="bf16")
    lin = torch.nn.Linear(64, 48, bias=bias)
    q = QLinear.from_linear(lin, r)
    x = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    y.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16 if bias else None), (torch.float32, None),
                    (torch.float32, None)]
    e = QLinear.from_linear(lin, dataclasses.replace(r, gemm="exact"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye = e(x)
    # one bf16 step at most: the two GeMMs may sum the fp32 products in different orders (bitwise on the EPYC;
    # a Xeon's oneDNN reorders), which can move a value across one bf16 rounding boundary
    assert ((y.float() - ye.float()).abs() <= 2.0 ** -7 * ye.float().abs()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8-tensor", "fp8-rowwise"])
def test_bias_in_the_epilogue_is_added_before_the_one_rounding(name, device):
    # The fused bias equals fp32 Y + bf16 bias then one rounding to bf16 (the unfused order): bit for bit on
    # CPUs; on a GPU the bf16-output GeMM may split K differently from the fp32-output one, so one bf16 step at
    # most, on a few elements. Bugs caught: the bias added after rounding Y to bf16 (a second rounding: ~25% of
    # elements differ), or the bias dropped. Block scales keep the unfused add (cuBLAS has no such epilogue).
    from lowbit.nn import hardware
    cpu_rowwise(name)
    spec = LinearSpec.from_recipe(recipes.get(name))
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(96, 256, generator=g).to(device) for _ in range(2))
    bias = (torch.randn(96, generator=g) * 4).to(device)
    opx, opw = hardware._operand(x, spec.input), hardware._operand(w, spec.weight)
    fused = hardware._gemm(opx, spec.input, opw, spec.weight, torch.bfloat16, hardware._fused_bias(bias, spec,
                                                                                                   torch.bfloat16))
    ref = (hardware._gemm(opx, spec.input, opw, spec.weight, torch.float32) + bias.bfloat16().float()).bfloat16()
    if device == "cpu":
        assert torch.equal(fused, ref)
    else:
        assert ((fused.float() - ref.float()).abs() <= 2.0 ** -7 * ref.float().abs()).all()
        assert (fused != ref).float().mean() < 0.05
    assert hardware._fused_bias(bias, LinearSpec.from_recipe(recipes.get("fp8-block")), torch.bfloat16) is None
    assert hardware._fused_bias(bias, spec, torch.float32) is None  # fp32 compute: Y fp32, the add unchanged


def test_cpu_tensorwise_scales_go_in_as_rows(monkeypatch):
    # fp8-tensor on a CPU whose torch has the per-row kernel: every GeMM gets its per-tensor scales as a column
    # [M, 1] and a row [1, N] of that one value (torch's per-tensor CPU kernel is a scalar loop on some CPUs: an
    # AMX Xeon ran 256^3 in 0.9 s there, 1.5 ms per row). Bug caught: the CPU clause dropped (0-d scales again).
    from lowbit.nn import hardware
    if not hardware.cpu_rowwise():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    seen = []
    real = torch._scaled_mm

    def spy(a, b, sa, sb, **kw):
        seen.append((tuple(sa.shape), tuple(sb.shape), a.shape[0], b.shape[1], float(sa.amin()), float(sa.amax())))
        return real(a, b, sa, sb, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    run("fp8-tensor", "hardware", "fp32", calls=1)
    assert len(seen) == 3
    for sa_shape, sb_shape, m, n, lo, hi in seen:
        assert sa_shape == (m, 1) and sb_shape == (1, n) and lo == hi  # one value, as rows
