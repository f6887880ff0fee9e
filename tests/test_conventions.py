"""Scale conventions against references that are not lowbit: a Transformer Engine-convention reference
re-derived here from TE's published formulas (quantization_current_scaling / quantization_nvfp4), torchao's
CPU paths (to_mx FLOOR / RCEIL, nvfp4_quantize, rowwise float8 with power-of-two scales), hand-computed
power-of-two scales, and a brute-force fp64 search for "4 over 6"."""
from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.quant import absmax_scale, fake_quantize, quantize
from lowbit.tensor_quant import TensorQuant

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def e2m1_nearest_even(v: torch.Tensor) -> torch.Tensor:
    """Brute force: the E2M1 grid point nearest to each fp64 value (saturating), ties to the even code."""
    a = v.abs().clamp(max=6.0)
    d = (a[..., None] - E2M1).abs()
    best = d.min(-1, keepdim=True).values
    cand = d == best
    # on a tie two codes are nearest; the even code (index) wins
    idx = torch.where(cand[..., ::2].any(-1), (cand[..., ::2].float().argmax(-1) * 2),
                      cand.float().argmax(-1))
    return torch.copysign(E2M1[idx], v)


def with_ties(shape, dtype, seed=0) -> torch.Tensor:
    """Gaussian data in `dtype`; bf16 data puts many x·e exactly on grid midpoints."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# --- Transformer Engine's convention --------------------------------------------------------------------

def te_fp8_current(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """TE's current-scaling reference: scale = fmax / amax (1 for amax 0), codes = cast(x·scale),
    dequantized = codes · (1/scale), all fp32."""
    fmax = torch.finfo(TORCH_FP8[fmt]).max
    amax = x.float().abs().amax()
    scale = torch.where(amax == 0, torch.tensor(1.0), fmax / amax)
    codes = (x.float() * scale).clamp(-fmax, fmax).to(TORCH_FP8[fmt])
    return codes.float() * torch.reciprocal(scale)


def te_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """TE's NVFP4 reference for 1×16 tiles: global encode g = 6·448 / amax; block decode d =
    e4m3(min(amax_b / 6 · g, 448)); encode = 1 / (d · (1/g)); codes = E2M1(clamp(x · encode, ±6));
    dequantized = codes · d · (1/g)."""
    x = x.float()
    R, C = x.shape
    xb = x.view(R, C // 16, 16)
    g = torch.tensor(6.0 * 448.0) / x.abs().amax()
    gd = 1.0 / g
    d = (xb.abs().amax(-1, keepdim=True) / 6.0 * g).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    enc = torch.clamp(1.0 / (d * gd), max=torch.finfo(torch.float32).max)
    codes = e2m1_nearest_even((xb * enc).clamp(-6, 6).double()).float()
    return (codes * (d * gd)).view(R, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_reciprocal_is_bit_exact_with_te_convention(dtype, fmt):
    x = with_ties((256, 512), dtype)
    q = TensorQuant(fmt, "tensor", reciprocal=True)
    got = fake_quantize(x.float(), q)
    torch.testing.assert_close(got, te_fp8_current(x, fmt), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_reciprocal_is_bit_exact_with_te_convention(dtype):
    x = with_ties((256, 512), dtype, seed=1)
    q = TensorQuant("e2m1", "tile", 16, "e4m3", reciprocal=True)
    torch.testing.assert_close(fake_quantize(x.float(), q), te_nvfp4(x), rtol=0, atol=0)


def test_divide_and_reciprocal_differ_only_on_ties_of_bf16_data():
    """The option is not a no-op: on bf16 data some codes flip (the issue measured 1,664 of 262,144 E5M2 codes),
    and every flip is an exact tie of x / s between two grid points."""
    x = with_ties((512, 512), torch.bfloat16, seed=2).float()
    div = quantize(x, TensorQuant("e5m2", "tensor")).codes.view(torch.float8_e5m2).double()
    rec = quantize(x, TensorQuant("e5m2", "tensor", reciprocal=True)).codes.view(torch.float8_e5m2).double()
    flips = div != rec
    assert 0 < int(flips.sum()) < 0.05 * x.numel()
    v = x.double()[flips] / absmax_scale(x, TensorQuant("e5m2", "tensor")).double()
    assert torch.allclose(v, (div[flips] + rec[flips]) / 2, rtol=1e-6, atol=0)  # the midpoint of the two codes


# --- torchao's reference paths ---------------------------------------------------------------------------

torchao = pytest.importorskip("torchao")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
@pytest.mark.parametrize("mode", ["floor", "ceil"])
def test_mx_matches_torchao_to_mx(dtype, fmt, mode):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 256, generator=g) * torch.logspace(-4, 4, 256)).to(dtype)  # scales over 27 binades
    elem = torch.float8_e4m3fn if fmt == "e4m3" else torch.float4_e2m1fn_x2
    calc = ScaleCalculationMode.FLOOR if mode == "floor" else ScaleCalculationMode.RCEIL
    scale, data = to_mx(x, elem, 32, calc)
    ref = to_dtype(data, scale, elem, 32, torch.float32)
    got = fake_quantize(x.float(), TensorQuant(fmt, "tile", 32, "e8m0", scale_round=mode))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _torchao_nvfp4(x):
    pts = per_tensor_amax_to_scale(x.abs().amax())
    sc, packed = nvfp4_quantize(x, 16, pts)
    v = f4_unpacked_to_f32(unpack_uint4(packed)).view(x.shape[0], -1, 16)
    return (v * (sc.float().unsqueeze(-1) * pts)).view(x.shape), pts, sc


def test_nvfp4_matches_torchao_fp32_bit_exact_and_bf16_up_to_ties():
    """torchao multiplies by (1/s_t)/s_b; lowbit divides by s_b·s_t. On fp32 data no code differs; on bf16
    data (many exact ties) the codes that differ are ties of x/s (within 1e-6 of a grid midpoint)."""
    x = with_ties((512, 1024), torch.float32, seed=4)
    q = TensorQuant("e2m1", "tile", 16, "e4m3")
    ref, _, _ = _torchao_nvfp4(x)
    torch.testing.assert_close(fake_quantize(x, q), ref, rtol=0, atol=0)
    xb = with_ties((512, 1024), torch.bfloat16, seed=5)
    ref, pts, sc = _torchao_nvfp4(xb)
    got = fake_quantize(xb.float(), q)
    diff = got != ref
    assert int(diff.sum()) < 0.01 * x.numel()
    s = (sc.float().unsqueeze(-1) * pts).expand(-1, -1, 16).reshape(x.shape).double()
    v = xb.double()[diff] / s[diff]
    mid = (got.double()[diff] + ref.double()[diff]) / 2 / s[diff]
    assert torch.allclose(v, mid, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_pow2_matches_torchao_float8_rowwise(dtype):
    """torchao's ROWWISE recipe: per-row E4M3 with scales rounded to powers of two (its encode factor rounded
    down = lowbit's decode scale 2^ceil(log2(amax/448)))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.float8.config import ScalingGranularity
        from torchao.float8.float8_utils import tensor_to_scale
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(128, 256, generator=g) * torch.logspace(-3, 3, 128)[:, None]).to(dtype)
    enc = tensor_to_scale(x, torch.float8_e4m3fn, scaling_granularity=ScalingGranularity.AXISWISE,
                          axiswise_dim=-1, round_scales_to_power_of_2=True)
    ref = (x.float() * enc).clamp(-448, 448).to(torch.float8_e4m3fn).float() / enc
    got = fake_quantize(x.float(), TensorQuant("e4m3", "row", scale_fmt="e8m0", scale_round="ceil"))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# --- power-of-two scales by hand -------------------------------------------------------------------------

@pytest.mark.parametrize("amax,floor,ceil", [
    (448.0, 2.0 ** (8 - 8), 1.0),          # OCP floor: 2^(floor(log2 448) - emax=8) = 1; ceil(log2(1)) = 0
    (449.0, 1.0, 2.0),                     # just above 448: ceil doubles the scale, floor keeps it
    (256.0, 1.0, 1.0),                     # 256/448 < 1: ceil(log2 0.571) = 0
    (255.0, 0.5, 1.0),
    (224.0, 0.5, 0.5),                     # 224/448 = 0.5 exactly: ceil keeps it
    (2.0 ** -130, 2.0 ** -127, 2.0 ** -127),  # subnormal absmax: E8M0's smallest scale
])
def test_pow2_scales_hand_computed(amax, floor, ceil):
    x = torch.tensor([[amax, -amax / 3]])
    for mode, want in (("floor", floor), ("ceil", ceil)):
        s = absmax_scale(x, TensorQuant("e4m3", "row", scale_fmt="e8m0", scale_round=mode))
        assert float(s) == want, (mode, float(s), want)


def test_ceil_never_saturates_floor_may():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 32, generator=g) * 10
    for mode in ("floor", "ceil"):
        q = TensorQuant("e2m1", "tile", 32, "e8m0", scale_round=mode)
        over = (x.abs() / absmax_scale(x, q).view(4096, 1, 1).reshape(4096, 1)) > 6.0
        assert bool(over.any()) == (mode == "floor")


# --- four over six -----------------------------------------------------------------------------------------

def four_over_six_ref(x: torch.Tensor) -> torch.Tensor:
    """fp64 brute force: per 1×16 block, candidates scale·6 = block max (s6) and scale·4 = block max (1.5·s6),
    each block scale cast to E4M3 against a tensor scale amax/(6·256); keep the smaller squared error."""
    x = x.double()
    R, C = x.shape
    xb = x.view(R, C // 16, 16)
    s_t = x.abs().amax() / (6 * 256)
    out, err = None, None
    for mult in (1.0, 1.5):
        sb = (xb.abs().amax(-1, keepdim=True) * mult / 6 / s_t).float().to(torch.float8_e4m3fn).double()
        s = sb * s_t
        y = e2m1_nearest_even(xb / s) * s
        e = (y - xb).square().sum(-1, keepdim=True)
        out, err = (y, e) if out is None else (torch.where(e < err, y, out), torch.minimum(e, err))
    return out.view(R, C), err


def test_four_over_six_picks_the_smaller_error_block_by_block():
    x = with_ties((128, 256), torch.float32, seed=8)
    q = TensorQuant("e2m1", "tile", 16, "e4m3", four_over_six=True)
    got = fake_quantize(x, q).double()
    ref, ref_err = four_over_six_ref(x)
    got_err = (got - x.double()).view(128, 16, 16).square().sum(-1, keepdim=True)
    # the same choice in (almost) every block; where the choice differs the errors tie to fp32 rounding
    assert torch.allclose(got_err, ref_err, rtol=1e-5, atol=1e-12)
    # the fp64 reference's scales are not rounded to fp32: values agree to fp32 precision, not bit for bit
    assert ((got - ref).abs() <= 1e-6 * ref.abs()).float().mean() > 0.999
    plain = fake_quantize(x, TensorQuant("e2m1", "tile", 16, "e4m3")).double()
    assert float(got_err.sum()) < float((plain - x.double()).square().sum())  # it helps on Gaussian data


def test_four_over_six_error_sums_are_pairwise():
    # The candidates' errors are summed pairwise, (e0 + e1) + (e2 + e3), the order kernels/fos.c repeats (a
    # tree both can follow; torch's own sum order is its implementation's). Hand-computed: with 1 and three
    # 2^-24, left to right gives 1 (each 1 + 2^-24 ties to even), pairwise 1 + 2^-23. Bug caught: the eager
    # reference back on torch's .sum (the CPU kernel would then pick differently on near-ties).
    from lowbit.groups import tree_sum
    t = torch.tensor([[[1.0, 2.0 ** -24, 2.0 ** -24, 2.0 ** -24]]])
    assert tree_sum(t, 2).item() == 1.0 + 2.0 ** -23
    blocks = t.view(1, 4, 1)  # over rows (a square block's rows): the same tree
    assert tree_sum(blocks, 1).item() == 1.0 + 2.0 ** -23 and tree_sum(blocks, 1).shape == (1, 1, 1)
    odd = torch.ones(1, 1, 3)  # not a power of two: torch's sum
    assert tree_sum(odd, 2).item() == 3.0
