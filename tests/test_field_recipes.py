"""The field's recipes against independent references: torchao's emulated Float8Linear (tensorwise, rowwise,
rowwise_with_gw_hp), torchao's to_mx for MXFP8, and NVIDIA's NVFP4 recipe rebuilt here from its formulas
(16×16 weight blocks shared by the forward and dX GeMMs). Layer selection (`high_precision`) on real and
synthetic models."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from lowbit import recipes as R
from lowbit.models import build_model
from lowbit.nn import QLinear, convert
from lowbit.nn.select import high_precision_names, selected_blocks
from lowbit.train.config import TrainConfig

torchao = pytest.importorskip("torchao")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx


def grads(mod, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = mod(x)
    y.backward(dy)
    return y.detach(), x.grad, mod.weight.grad


def torchao_linear(lin, name):
    cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name(name), emulate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_to_float8_training(nn.Sequential(copy.deepcopy(lin)), config=cfg)[0]


@pytest.mark.parametrize("ours,theirs", [("fp8-rowwise", "rowwise"), ("fp8-rowwise-gw-hp", "rowwise_with_gw_hp"),
                                         ("fp8-tensor", "tensorwise")])
def test_fp8_recipes_match_torchao_float8_linear(ours, theirs):
    """Same forward, dX and dW as torchao's emulated Float8Linear (fp32 compute; torchao multiplies by its
    encode scale, so fp8-tensor is compared with reciprocal=True; the rowwise scales are powers of two, for which
    both conventions agree)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    r = R.get(ours).replace(compute_dtype="fp32")
    if ours == "fp8-tensor":
        r = r.replace(**{f"{op}.reciprocal": True for op in ("input", "weight", "grad_output")})
    x = torch.randn(32, 128) * torch.logspace(-2, 2, 32)[:, None]
    dy = torch.randn(32, 64)
    got = grads(QLinear.from_linear(copy.deepcopy(lin), r), x, dy)
    ref = grads(torchao_linear(lin, theirs), x, dy)
    for g, w in zip(got, ref):
        # torchao dequantizes by dividing by its encode scale, lowbit multiplies by the decode scale: one ulp
        # per element, so the tolerance is relative to the output's magnitude (cancellation near zero)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


def test_fp8_rowwise_gw_hp_weight_gradient_is_unquantized():
    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    x, dy = torch.randn(16, 64), torch.randn(16, 32)
    _, _, dw = grads(QLinear.from_linear(copy.deepcopy(lin), R.get("fp8-rowwise-gw-hp").replace(compute_dtype="fp32")),
                     x, dy)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-6, atol=1e-6)  # the same fp32 GeMM, another summation order


def mx(t, mode):
    calc = ScaleCalculationMode.FLOOR if mode == "floor" else ScaleCalculationMode.RCEIL
    s, d = to_mx(t.contiguous(), torch.float8_e4m3fn, 32, calc)
    return to_dtype(d, s, torch.float8_e4m3fn, 32, torch.float32)


@pytest.mark.parametrize("name,mode", [("mxfp8", "floor"), ("mxfp8-rceil", "ceil")])
def test_mxfp8_gemms_match_torchao_to_mx(name, mode):
    """Each GeMM multiplies operands MX-quantized by torchao along that GeMM's reduction dim."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 96, bias=False)
    x, dy = torch.randn(64, 64) * 3, torch.randn(64, 96)
    y, dx, dw = grads(QLinear.from_linear(copy.deepcopy(lin), R.get(name).replace(compute_dtype="fp32")), x, dy)
    w = lin.weight.detach()
    # identical quantized operands (bit-exact with to_mx, test_conventions); only the fp32 summation order differs
    torch.testing.assert_close(y, mx(x, mode) @ mx(w, mode).t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, mx(dy, mode) @ mx(w.t(), mode).t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, mx(dy.t(), mode) @ mx(x.t(), mode).t(), rtol=1e-5, atol=1e-5)


# --- NVIDIA's NVFP4 --------------------------------------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def e2m1(v):
    """Nearest E2M1 value, ties to the even code (brute force over the grid)."""
    a = v.abs().clamp(max=6.0)
    d = (a[..., None] - E2M1).abs()
    tie_even = (d[..., ::2] == d.min(-1, keepdim=True).values).any(-1)
    idx = torch.where(tie_even, d[..., ::2].argmin(-1) * 2, d.argmin(-1))
    return torch.copysign(E2M1[idx], v)


def nvfp4_ref(t, rows=1):
    """NVFP4 with rows×16 groups (1 = 1×16 tiles, 16 = 16×16 blocks): tensor scale amax/(6·448), group scale
    cast to E4M3 by torch, values to the nearest E2M1 point; fp64 arithmetic, fp32 result."""
    t = t.double()
    R_, C = t.shape
    g = t.view(R_ // rows, rows, C // 16, 16)
    s_t = t.abs().amax() / (6 * 448)
    sb = (g.abs().amax(dim=(1, 3), keepdim=True) / 6 / s_t).float().to(torch.float8_e4m3fn).double()
    s = sb.clamp_min(2.0 ** -9) * s_t
    return (e2m1(g / s) * s).view(R_, C).float()


def test_nvfp4_is_nvidias_recipe():
    """Forward Q16(X)·Qblock(W)ᵀ and dX = Q16(dY)·Qblock(W) with the SAME 16×16-block weight (rounding to nearest
    here, the recipe's stochastic gradients switched off so the reference is deterministic)."""
    r = R.get("nvfp4").replace(compute_dtype="fp32", **{"grad_output.rounding": "nearest"})
    assert r.weight.granularity == "block" and r.weight.block == 16
    assert r.grad_output.hadamard and r.input.rounding == "nearest" and r.weight.rounding == "nearest"
    assert R.get("nvfp4").grad_output.rounding == "stochastic"
    torch.manual_seed(3)
    lin = nn.Linear(64, 48, bias=False)
    x, dy = torch.randn(32, 64), torch.randn(32, 48)
    y, dx, _ = grads(QLinear.from_linear(copy.deepcopy(lin), r), x, dy)
    wq = nvfp4_ref(lin.weight.detach(), rows=16)
    # the reference's fp64 scales are rounded to fp32 afterwards, and the GeMMs sum in another order
    torch.testing.assert_close(y, nvfp4_ref(x) @ wq.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, nvfp4_ref(dy) @ wq, rtol=1e-5, atol=1e-5)


# --- layer selection ---------------------------------------------------------------------------------------

class Stack(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)) for _ in range(n))
        self.lm_head = nn.Linear(16, 8)


@pytest.mark.parametrize("patterns,n,want", [
    (("first:2", "last:8"), 62, set(range(2)) | set(range(54, 62))),
    (("share:16%",), 62, set(range(2)) | set(range(54, 62))),   # NVIDIA's 12B split
    (("share:16%",), 12, {10, 11}),
    (("share:16%",), 4, {3}),                                   # at least one block
    (("first:25%",), 8, {0, 1}),
    (("last:0",), 8, set()),
    (("first:3", "last:3"), 4, {0, 1, 2, 3}),
])
def test_selected_blocks(patterns, n, want):
    assert selected_blocks(patterns, n) == want


def test_convert_keeps_selected_layers_in_high_precision():
    m = convert(Stack(10), R.get("fp8-tensor").replace(high_precision=("first:1", "last:2", "*.1")))
    kept = {n for n, mod in m.named_modules() if type(mod) is nn.Linear}
    want = {f"layers.{i}.{j}" for i in (0, 8, 9) for j in (0, 1)} | {f"layers.{i}.1" for i in range(10)} | {"lm_head"}
    assert kept == want
    assert all(isinstance(m.layers[i][0], QLinear) for i in range(1, 8))


def test_nvfp4_default_selection_on_presets():
    m = convert(build_model("small", vocab_size=64), "nvfp4")  # 6 blocks -> round(0.96) = 1, the last
    assert high_precision_names(m, ("share:16%",)) >= {"transformer.h.5.attn.c_attn"}
    assert not isinstance(m.transformer.h[5].mlp.c_fc, QLinear) and isinstance(m.transformer.h[4].mlp.c_fc, QLinear)


@pytest.mark.parametrize("bad", ["first:x", "share:3", "last:150%", "share:"])
def test_bad_patterns_name_the_grammar(bad):
    with pytest.raises(ValueError, match="high_precision pattern"):
        R.get("nvfp4").replace(high_precision=(bad,))


def test_high_precision_round_trips_and_overrides_from_config(tmp_path):
    r = R.get("fp8-tensor").replace(high_precision="last:2, *.attn.c_proj")
    assert r.high_precision == ("last:2", "*.attn.c_proj")
    assert R.Recipe.from_toml(r.to_toml()) == r
    assert TrainConfig(recipe="nvfp4", high_precision="none").resolved_recipe().high_precision == ()
    assert TrainConfig(recipe="nvfp4", high_precision="first:1").resolved_recipe().high_precision == ("first:1",)
    assert TrainConfig(recipe="nvfp4").resolved_recipe() == R.get("nvfp4")
    with pytest.raises(ValueError, match="high_precision pattern"):
        TrainConfig(recipe="nvfp4", high_precision="share:2").check_names()
