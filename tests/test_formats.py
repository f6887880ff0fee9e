"""lowbit.formats against references: torch's float8 dtypes (every bf16/fp16 bit
pattern), hand-written value tables, brute-force nearest-value search."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import cast, get_format

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOWBIT = ["e2m1", "e1m2", "e3m0", "e4m3", "e5m2"]
FP4 = ["e2m1", "e1m2", "e3m0"]


def all_bf16():
    """All 65,536 bf16 bit patterns."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def all_fp16():
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)


def brute_force(x: torch.Tensor, table: list[float], tie: str = "even") -> torch.Tensor:
    """Nearest value of ±table (magnitude i = code i) in float64; |x| beyond the table
    saturates (nearest is the max); NaN -> NaN. Ties: tie="even" -> the even code;
    tie="up" (formats without mantissa bits, e.g. E3M0, where "even" is undefined) -> the
    larger magnitude, except that the tie between 0 and the smallest value goes to 0."""
    v = torch.tensor(table, dtype=torch.float64)
    # beyond 2·max the nearest value is max; clamping keeps the float64 distances exact
    a = x.double().abs().nan_to_num(posinf=math.inf).clamp(max=2 * max(table))
    d = (a[:, None] - v[None, :]).abs()
    best = d.min(1, keepdim=True).values
    cand = d == best
    idx = torch.arange(len(table))
    # among equally near values (at most two), take the preferred one
    if tie == "even":
        pref = ((idx % 2) == 0).double()[None, :].expand_as(d)
    else:
        pref = idx.double()[None, :].expand_as(d).clone()
        pref[:, 0] = torch.where(cand[:, 1], 100.0, 0.0)  # 0 wins its tie with the smallest value
    score = torch.where(cand, 1000.0 + pref, 0.0)
    pick = score.argmax(1)
    out = v[pick] * torch.where(torch.signbit(x), -1.0, 1.0).double()
    return torch.where(x.isnan(), math.nan, out)


TABLES = {  # hand-written, from the format definitions in the module docstring
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
    "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
}


# --- the format table -------------------------------------------------------------------------

@pytest.mark.parametrize("name", FP4)
def test_fp4_value_tables(name):
    assert get_format(name).values().tolist() == TABLES[name]
    assert get_format(name).max == TABLES[name][-1]


def test_fp8_and_e8m0_tables():
    e4, e5, e8 = get_format("e4m3"), get_format("e5m2"), get_format("e8m0")
    # reference: every finite non-negative value of torch's float8 dtypes
    for f, dt in ((e4, torch.float8_e4m3fn), (e5, torch.float8_e5m2)):
        ref = torch.arange(128, dtype=torch.uint8).view(dt).double()
        ref = ref[torch.isfinite(ref)]
        assert torch.equal(f.values(), ref)
    assert (e4.max, e4.min_normal, e4.min_subnormal, e4.has_inf, e4.has_nan) == (448, 2**-6, 2**-9, False, True)
    assert (e5.max, e5.min_normal, e5.min_subnormal, e5.has_inf, e5.has_nan) == (57344, 2**-14, 2**-16, True, True)
    assert e8.values().tolist() == [2.0**k for k in range(-127, 128)]
    assert get_format("e2m1").emax == 2 and e4.emax == 8 and e5.emax == 15


def test_get_format_unknown():
    with pytest.raises(ValueError, match="e2m1"):
        get_format("fp4")


# --- FP8 against torch, every bf16 / fp16 bit pattern -----------------------------------------

@pytest.mark.parametrize("name,tdt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
@pytest.mark.parametrize("src", ["bf16", "bf16->fp32", "fp16"])
def test_fp8_matches_torch_on_all_patterns(name, tdt, src):
    x = {"bf16": all_bf16, "bf16->fp32": lambda: all_bf16().float(), "fp16": all_fp16}[src]()
    ref = x.to(tdt).float()
    got = cast(x, name)
    assert got.dtype == x.dtype
    got = got.float()
    m = torch.isfinite(x) & torch.isfinite(ref)
    assert m.sum() > 30000
    assert torch.equal(got[m], ref[m])
    assert torch.equal(torch.signbit(got[m]), torch.signbit(ref[m]))  # signed zeros included


@pytest.mark.parametrize("name", LOWBIT)
def test_saturation_nan_inf(name):
    f = get_format(name)
    x = torch.tensor([f.max * 1.01, -f.max * 1.01, f.max * 1e6, 3e38, -3e38, math.inf, -math.inf, math.nan,
                      0.0, -0.0])
    y = cast(x, name)
    big = f.max
    assert y[:5].tolist() == [big, -big, big, big, -big]
    if f.has_inf:
        assert y[5].item() == math.inf and y[6].item() == -math.inf
    else:
        assert y[5].item() == big and y[6].item() == -big
    assert math.isnan(y[7].item())  # NaN kept, also for formats without a NaN code
    assert y[8].item() == 0 and not torch.signbit(y[8]) and y[9].item() == 0 and torch.signbit(y[9])


def test_e4m3_saturates_where_torch_rounds_past_max():
    # 464 is the midpoint between 448 and the (nonexistent) 480: RNE would leave the format.
    y = cast(torch.tensor([449.0, 463.9, 464.0, 479.0, 1e5]), "e4m3")
    assert y.tolist() == [448.0] * 5
    y = cast(torch.tensor([57344.0, 61439.0, 61440.0, 1e9]), "e5m2")
    assert y.tolist() == [57344.0] * 4  # torch's own e5m2 cast gives inf for the last two


# --- FP4 against hand tables and brute force --------------------------------------------------

def test_e2m1_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0])
    assert cast(x, "e2m1").tolist() == [0, 1, 1, 2, 2, 4, 4, -0.0, -1, -2, -4]
    assert torch.signbit(cast(torch.tensor([-0.25]), "e2m1")).item()  # -0.25 -> -0.0


def test_e3m0_ties():
    # no mantissa bit: a tie between 2^e and 2^(e+1) goes up (as torch's e8m0 cast does), 0.125 goes to 0
    x = torch.tensor([0.125, 0.375, 0.75, 1.5, 3.0, 6.0, 12.0, 24.0, -0.75])
    assert cast(x, "e3m0").tolist() == [0, 0.5, 1, 2, 4, 8, 16, 16, -1]


def test_e2m1_hand_examples():
    x = torch.tensor([0.2, 0.26, 0.7499, 0.76, 1.2, 1.3, 2.49, 2.51, 3.49, 3.51, 4.99, 5.01, 5.99, 6.0, 7.0])
    assert cast(x, "e2m1").tolist() == [0, 0.5, 0.5, 1, 1, 1.5, 2, 3, 3, 4, 4, 6, 6, 6, 6]


@pytest.mark.parametrize("name", FP4)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_fp4_brute_force_all_patterns(name, dtype):
    x = all_bf16() if dtype != "fp16" else all_fp16()
    if dtype == "fp32":  # bf16 patterns as fp32, plus their midpoints (exact in fp32): ties and in-betweens
        b = x.float()
        x = torch.cat([b, (b[:-1] + b[1:]) / 2])
    got = cast(x, name).double()
    ref = brute_force(x, TABLES[name], tie="up" if name == "e3m0" else "even")
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], ref[~nan])
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(ref[~nan]))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_fp8_brute_force_random_fp32(name):
    # fp32 inputs with more mantissa bits than bf16 (incl. fp32 subnormals), vs nearest search
    g = torch.Generator().manual_seed(0)
    f = get_format(name)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-40, 18, (20000,), generator=g).float())
    x = torch.cat([x, torch.tensor([1e-40, -1e-45, f.min_subnormal / 2, f.min_subnormal * 1.5])])
    assert torch.equal(cast(x, name).double(), brute_force(x, f.values().tolist()))


# --- E8M0 and pass-through --------------------------------------------------------------------

def test_e8m0_matches_torch():
    x = all_bf16()
    ref = x.to(torch.float8_e8m0fnu).float()
    got = cast(x, "e8m0").float()
    # positive normal inputs (torch rounds fp32 subnormals in (2^-127, 2^-126) up, not to nearest)
    m = torch.isfinite(x) & (x.float() >= 2.0**-126) & torch.isfinite(ref)
    assert m.sum() > 16000
    assert torch.equal(got[m], ref[m])
    special = torch.tensor([0.0, -0.0, 1e-45, 1.4e-38, -1.0, math.inf, 2.0**127 * 1.9, math.nan])
    got = cast(special, "e8m0")
    assert got[:3].tolist() == [2.0**-127] * 3
    assert got[3].item() == 2.0**-126  # 1.4e-38 is nearer 2^-126 (1.18e-38) than 2^-125
    assert math.isnan(got[4].item()) and math.isnan(got[7].item())
    assert got[5].item() == 2.0**127 and got[6].item() == 2.0**127


@pytest.mark.parametrize("name,tdt", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_passthrough(name, tdt):
    x = torch.randn(1000) * 100
    assert torch.equal(cast(x, name), x.to(tdt).float())
    assert torch.equal(cast(x, "fp32"), x)


# --- stochastic rounding ----------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [("e2m1", 2.3), ("e2m1", 0.1), ("e2m1", -4.9), ("e1m2", 1.2),
                                        ("e3m0", 5.0), ("e4m3", 0.013), ("e5m2", 1000.0), ("e4m3", 3e-3)])
def test_stochastic_rounding_unbiased(name, value):
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    x = torch.full((n,), value)
    y = cast(x, name, rounding="stochastic", generator=g).double()
    vals = get_format(name).values()
    a = abs(value)
    lo, hi = vals[vals <= a].max().item(), vals[vals >= a].min().item()
    # only the two neighbours occur
    assert set(y.abs().unique().tolist()) <= {lo, hi}
    # mean within 5 standard errors: a Bernoulli(p) choice between lo and hi has sd (hi-lo)·sqrt(p(1-p));
    # with a fixed seed this is deterministic, 5 SE makes a false failure a ~1e-6 event for other seeds
    p = (a - lo) / (hi - lo)
    se = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - value) <= 5 * se + 1e-12


def test_stochastic_rounding_keeps_grid_values_and_specials():
    f = get_format("e2m1")
    x = torch.cat([f.values().float(), -f.values().float(), torch.tensor([7.0, math.inf, math.nan])])
    g = torch.Generator().manual_seed(0)
    y = cast(x, "e2m1", rounding="stochastic", generator=g)
    assert torch.equal(y[:16], x[:16])
    assert y[16].item() == 6 and y[17].item() == 6 and math.isnan(y[18].item())


def test_stochastic_bf16_unbiased():
    n = 200_000
    value = 1.0 + 2.0**-9  # a quarter of the way between bf16 neighbours 1 and 1 + 2^-7
    g = torch.Generator().manual_seed(7)
    y = cast(torch.full((n,), value), "bf16", rounding="stochastic", generator=g).double()
    step = 2.0**-7
    se = step * math.sqrt(0.25 * 0.75 / n)  # Bernoulli(1/4) sd, as above
    assert set(y.unique().tolist()) <= {1.0, 1.0 + step}
    assert abs(y.mean().item() - value) <= 5 * se


def test_stochastic_reproducible_with_generator():
    x = torch.randn(1000)
    a = cast(x, "e2m1", "stochastic", torch.Generator().manual_seed(3))
    b = cast(x, "e2m1", "stochastic", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --- shapes, dtypes, devices, errors ----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5, 7), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_dtypes(device, shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    y = cast(x, "e2m1")
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.equal(y.double().cpu().flatten(), brute_force(x.cpu().flatten(), TABLES["e2m1"]))


def test_non_contiguous_and_large():
    x = torch.randn(300, 5000).t()  # non-contiguous, more than one in-cache chunk
    y = cast(x, "e4m3")
    assert torch.equal(y, x.contiguous().to(torch.float8_e4m3fn).float())


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32"):
        cast(torch.arange(4), "e2m1")
    with pytest.raises(ValueError, match="rounding"):
        cast(torch.randn(4), "e2m1", rounding="up")
    with pytest.raises(ValueError, match="stochastic"):
        cast(torch.randn(4), "fp16", rounding="stochastic")


# --- properties -------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=64), st.sampled_from(LOWBIT))
def test_cast_properties(vals, name):
    x = torch.tensor(vals, dtype=torch.float32)
    y = cast(x, name)
    f = get_format(name)
    assert torch.isfinite(y).all()  # finite in, finite out (saturation)
    assert torch.equal(cast(y, name), y)  # idempotent
    assert torch.equal(cast(-x, name), -y)  # sign symmetric
    xs, order = x.sort()
    assert (y[order].diff() >= 0).all()  # monotone
    grid = set(f.values().tolist())
    assert set(y.abs().tolist()) <= grid  # on the grid
