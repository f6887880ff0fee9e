"""lowbit.estimators against hand tables, closed forms, finite differences and numpy.quantile."""
import math

import numpy as np
import pytest
import torch

from lowbit.estimators import _extreme_pair, dge_derivative, dge_function, occ_clamp, quantile_pair
from lowbit.formats import get_format

# E2M1 magnitudes, by hand (the paper's grid)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ref_interval(a, grid):
    """(q_lo, q_hi) of the grid interval [q_lo, q_hi) holding magnitude a <= max, by search
    (a == max belongs to the last interval)."""
    for lo, hi in zip(grid[:-1], grid[1:]):
        if lo <= a < hi:
            return lo, hi
    assert a == grid[-1]
    return grid[-2], grid[-1]


def ref_dge(x, grid=E2M1, k=5.0, clamp=3.0):
    """The DESIGN.md closed form f'(x) = (1/k)|2u/δ − 1|^(1/k − 1), clamped; 0 beyond max."""
    a = abs(x)
    if a > grid[-1]:
        return 0.0
    lo, hi = ref_interval(a, grid)
    d = hi - lo
    t = abs(2 * (a - lo) / d - 1)
    return clamp if t == 0 else min(t ** (1 / k - 1) / k, clamp)


def ref_f(x, grid=E2M1, k=5.0):
    a = abs(x)
    if a > grid[-1]:
        return math.copysign(grid[-1], x)
    lo, hi = ref_interval(a, grid)
    d = hi - lo
    t = 2 * (a - lo) / d - 1
    return math.copysign(lo + d * (1 + math.copysign(abs(t) ** (1 / k), t)) / 2, x)


# --- DGE ---------------------------------------------------------------------------------------

def test_dge_derivative_matches_closed_form_on_e2m1():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4000, generator=g, dtype=torch.float64) * 2 - 1) * 6.5  # includes saturated |x| > 6
    got = dge_derivative(x, "e2m1").tolist()
    want = [ref_dge(v) for v in x.tolist()]
    # both in float64; the only difference is pow's last-bit rounding
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k,clamp", [(5.0, 3.0), (3.0, 3.0), (5.0, 10.0), (2.0, 1.5)])
def test_dge_derivative_closed_form_fp32_other_k(k, clamp):
    x = torch.linspace(-6, 6, 2401)  # grid points, midpoints and everything between
    got = dge_derivative(x, "e2m1", k, clamp)
    assert got.dtype == torch.float32
    want = torch.tensor([ref_dge(v, k=k, clamp=clamp) for v in x.double().tolist()], dtype=torch.float64)
    # fp32 evaluation: t = 2u/δ − 1 carries ~1e-7 absolute error, relative ~3e-6 at the smallest
    # unclamped t (~0.03), amplified by |1/k − 1| < 1 in the power
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_dge_special_points():
    k = 5.0
    grid = torch.tensor(E2M1[1:], dtype=torch.float32)
    pts = torch.cat([-grid, torch.zeros(1), grid])
    assert torch.equal(dge_derivative(pts), torch.full_like(pts, 1 / k))  # on the grid: 1/k
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert torch.equal(dge_derivative(torch.cat([mids, -mids])), torch.full((14,), 3.0))  # clamp at midpoints
    sat = torch.tensor([6.0001, -6.5, 100.0, -math.inf, math.inf])
    assert torch.equal(dge_derivative(sat), torch.zeros(5))  # saturated: flat quantizer
    assert dge_derivative(torch.tensor([math.nan])).isnan().all()
    # k = 1: f is the identity, f' = 1 everywhere inside the range
    assert torch.equal(dge_derivative(torch.linspace(-6, 6, 101), k=1.0), torch.ones(101))


def test_dge_function_closed_form_and_grid():
    x = torch.linspace(-7, 7, 1401, dtype=torch.float64)
    got = dge_function(x).tolist()
    want = [ref_f(v) for v in x.tolist()]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    grid = torch.tensor(E2M1, dtype=torch.float64)
    assert torch.equal(dge_function(grid), grid)  # meets the quantizer on every grid point
    assert torch.equal(dge_function(-grid), -grid)
    assert (dge_function(x).diff() >= 0).all()  # monotone


def test_dge_derivative_matches_finite_differences():
    """f' against central differences of f, away from interval ends (kinks of f') and
    from midpoints (f' is clamped there, f is not)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(3000, generator=g, dtype=torch.float64) * 2 - 1) * 6
    a = x.abs()
    lo = torch.tensor([ref_interval(v, E2M1)[0] for v in a.tolist()], dtype=torch.float64)
    hi = torch.tensor([ref_interval(v, E2M1)[1] for v in a.tolist()], dtype=torch.float64)
    u = (a - lo) / (hi - lo)
    d = dge_derivative(x)
    keep = (u > 0.01) & (u < 0.99) & (d < 2.9)
    x = x[keep]
    h = 1e-7
    fd = (dge_function(x + h) - dge_function(x - h)) / (2 * h)
    # central difference error ~ h² f''' plus rounding ~1e-16/h: about 1e-8 relative here
    torch.testing.assert_close(dge_derivative(x), fd, rtol=1e-6, atol=1e-7)
    assert keep.sum() > 1000


@pytest.mark.parametrize("fmt", ["e1m2", "e3m0", "e4m3", "e5m2"])
def test_dge_other_formats_against_value_table(fmt):
    f = get_format(fmt)
    grid = f.values().tolist()  # the format's own table (independent of the exponent trick)
    vals = torch.tensor(grid, dtype=torch.float64)
    mids = (vals[1:] + vals[:-1]) / 2
    quarter = vals[:-1] + (vals[1:] - vals[:-1]) / 4
    x = torch.cat([vals, mids, quarter, -quarter, torch.tensor([f.max * 1.01])])
    want = [ref_dge(v, grid) for v in x.tolist()]
    np.testing.assert_allclose(dge_derivative(x, fmt).tolist(), want, rtol=1e-12)


def test_dge_bad_input():
    with pytest.raises(ValueError, match="low-bit"):
        dge_derivative(torch.zeros(3), "bf16")
    with pytest.raises(ValueError, match="low-bit"):
        dge_derivative(torch.zeros(3), "e8m0")
    with pytest.raises(ValueError, match="k must be"):
        dge_derivative(torch.zeros(3), "e2m1", k=0)
    with pytest.raises(ValueError, match="clamp"):
        dge_derivative(torch.zeros(3), "e2m1", clamp=-1)
    with pytest.raises(TypeError, match="floating-point"):
        dge_derivative(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown number format"):
        dge_derivative(torch.zeros(3), "e9m9")


# --- OCC ---------------------------------------------------------------------------------------
# numpy.quantile's default method is "linear" (type 7), the interpolation lowbit uses.

@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001, 50_000, 300_007])
@pytest.mark.parametrize("alpha", [0.51, 0.97, 0.99, 0.999])
def test_quantiles_match_numpy(n, alpha):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    lo, hi = quantile_pair(x, alpha)
    want = np.quantile(x.double().numpy(), [1 - alpha, alpha])
    # interpolation in float64 on exact fp32 order statistics: agrees to float64 rounding
    np.testing.assert_allclose([lo.item(), hi.item()], want, rtol=1e-12, atol=1e-12)


def test_quantiles_with_ties_and_structure():
    """Heavy ties and a column-structured tensor (outlier channels, the shape activations have)."""
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 4, (400_000,), generator=g).float()
    x = torch.randn(512, 768, generator=g)
    x[:, ::97] *= 50  # a few outlier channels
    for t in (ties, x, x.t().contiguous(), -x):
        for alpha in (0.99, 0.999, 0.9):
            lo, hi = quantile_pair(t, alpha)
            want = np.quantile(t.double().numpy(), [1 - alpha, alpha])
            np.testing.assert_allclose([lo.item(), hi.item()], want, rtol=1e-12, atol=1e-12)


def test_quantiles_closed_form_on_a_permutation():
    """x = a permutation of 0..n−1: the linear-interpolation quantile q is q·(n−1)."""
    n = 270_001
    x = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()
    for alpha in (0.99, 0.97, 0.999, 0.75):
        lo, hi = quantile_pair(x, alpha)
        assert lo.item() == pytest.approx((1 - alpha) * (n - 1), abs=1e-6)
        assert hi.item() == pytest.approx(alpha * (n - 1), abs=1e-6)


def test_extreme_pair_against_sort():
    """The sampled bracketing (large CPU tensors) returns exactly the sorted order statistics."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(500_000, generator=g), torch.full((1000,), 7.0)])  # a tied top block
    s = torch.sort(x).values
    n = x.numel()
    for k in (1, 2, 999, 1000, 1001, 5000, 100_000):
        a, b = _extreme_pair(x, k, largest=True)
        assert a.item() == s[n - k].item() and b.item() == s[n - max(k - 1, 1)].item()
        a, b = _extreme_pair(x, k, largest=False)
        assert a.item() == s[k - 1].item() and b.item() == s[max(k - 2, 0)].item()


def test_occ_clamp_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=g) * 2
    xc, res, lo, hi = occ_clamp(x, 0.99)
    want = np.quantile(x.double().numpy(), [0.01, 0.99])
    assert lo.dtype == x.dtype and hi.dtype == x.dtype
    np.testing.assert_allclose([lo.item(), hi.item()], want, rtol=1e-6)  # fp32 thresholds
    assert torch.equal(xc, x.clamp(lo.item(), hi.item()))
    assert torch.equal(res, x - xc)
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(res[inside], torch.zeros(int(inside.sum())))
    assert (res[~inside] != 0).all()
    # about 2·(1−α) of the entries are clamped (exactly: the entries beyond the interpolated thresholds)
    frac = (res != 0).float().mean().item()
    assert abs(frac - 0.02) < 0.002
    assert xc.shape == x.shape and res.dtype == x.dtype


def test_occ_alpha_one_clamps_nothing():
    x = torch.randn(10, 17)
    xc, res, lo, hi = occ_clamp(x, 1.0)
    assert torch.equal(xc, x) and torch.equal(res, torch.zeros_like(x))
    assert lo.item() == x.min().item() and hi.item() == x.max().item()


def test_occ_bf16_and_nan():
    x = torch.randn(1000).bfloat16()
    xc, res, lo, hi = occ_clamp(x, 0.97)
    assert xc.dtype == torch.bfloat16 and lo.dtype == torch.bfloat16
    want = np.quantile(x.double().numpy(), [0.03, 0.97])
    np.testing.assert_allclose([lo.item(), hi.item()], want, rtol=2 ** -8)  # rounded to bf16
    y = torch.randn(100)
    y[5] = math.nan
    xc, _, lo, hi = occ_clamp(y, 0.99)
    assert lo.isnan() and hi.isnan() and xc.isnan().all()  # surfaces, never silently dropped


def test_occ_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        occ_clamp(torch.randn(10), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        occ_clamp(torch.randn(10), 1.01)
    with pytest.raises(ValueError, match="non-empty"):
        occ_clamp(torch.randn(0), 0.99)
    with pytest.raises(TypeError):
        occ_clamp(torch.arange(10), 0.99)


# --- OCC per token (the authors' index rule) ---------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowbit.estimators import occ_clamp_rows  # noqa: E402


def _rows_ref(x: np.ndarray, alpha: float):
    """Per row: numpy's sort, the bounds at int((1-a)K) and int(aK) (K-1 at most), numpy's clip."""
    K = x.shape[1]
    srt = np.sort(x, axis=1)
    lo, hi = srt[:, int((1 - alpha) * K)][:, None], srt[:, min(int(alpha * K), K - 1)][:, None]
    return np.clip(x, lo, hi), lo, hi


@pytest.mark.parametrize("alpha", [0.99, 0.97, 0.999, 0.75])
@pytest.mark.parametrize("K", [7, 64, 130])
def test_occ_rows_match_the_index_rule(alpha, K):
    torch.manual_seed(K)
    x = torch.randn(9, K) * torch.logspace(0, 2, K)
    xc, res, lo, hi = occ_clamp_rows(x, alpha)
    want, wlo, whi = _rows_ref(x.double().numpy(), alpha)
    np.testing.assert_array_equal(xc.double().numpy(), want)
    np.testing.assert_array_equal(lo.double().numpy(), wlo)
    np.testing.assert_array_equal(hi.double().numpy(), whi)
    assert torch.equal(res, x - xc) and lo.shape == (9, 1)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), K=st.integers(1, 40), alpha=st.floats(0.51, 1.0),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       special=st.sampled_from([None, "zeros", "ties", "inf"]))
def test_occ_rows_properties(rows, K, alpha, dtype, special):
    g = torch.Generator().manual_seed(rows * 100 + K)
    x = torch.randn(rows, K, generator=g).to(dtype)
    if special == "zeros":
        x = torch.zeros_like(x)
    elif special == "ties":
        x = torch.round(x)
    elif special == "inf":
        x[0, 0] = float("inf")
    xc, res, lo, hi = occ_clamp_rows(x, alpha)
    assert xc.dtype == res.dtype == lo.dtype == dtype and xc.shape == x.shape
    assert ((xc >= lo) & (xc <= hi)).all() and (lo <= hi).all()
    inside = (x >= lo) & (x <= hi) & torch.isfinite(x)  # (an inf that is its own bound leaves inf - inf = NaN)
    assert torch.equal(xc[inside], x[inside]) and (res[inside] == 0).all()  # only the outliers move
    want, _, _ = _rows_ref(x.double().numpy(), alpha)
    np.testing.assert_array_equal(xc.double().numpy(), want)


def test_occ_rows_nan_and_bad_input():
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    xc, _, lo, hi = occ_clamp_rows(x, 0.9)
    assert torch.isfinite(xc[[0, 2]]).all()  # other tokens unaffected
    with pytest.raises(TypeError):
        occ_clamp_rows(torch.randn(2, 3, 4), 0.9)
    with pytest.raises(ValueError, match="alpha"):
        occ_clamp_rows(x, 0.4)
    with pytest.raises(ValueError, match="non-empty"):
        occ_clamp_rows(torch.randn(0, 4), 0.9)
