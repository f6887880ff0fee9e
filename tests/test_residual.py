"""OCC's sparse residual (lowbit.nn.residual): the sparse rows against the dense residual they hold, the two
products' references against the products they define, and the compiled kernels (kernels/occ.c) bit for bit
against those references."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.estimators import occ_clamp_rows
from lowbit.kernels import cpu
from lowbit.kernels import occ as OK
from lowbit.nn import residual as R

needs_cc = pytest.mark.skipif(cpu.compiler() is None, reason="no C compiler: the kernels cannot be built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits_equal(a, b):
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    it = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.masked_fill(a.isnan(), 0).view(it), b.masked_fill(b.isnan(), 0).view(it))


def sparse_residual(M, K, dtype, seed, density=0.05):
    """A residual-like [M, K]: mostly zeros (both signs), a few values over many decades, an empty row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.empty(M, K).uniform_(-8, 8, generator=g))
    x[torch.rand(M, K, generator=g) > density] = 0.0
    x[torch.rand(M, K, generator=g) < 0.02] = -0.0
    if M > 2:
        x[1] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_from_dense_holds_the_nonzeros(dtype):
    """Every nonzero (NaN too, ±0 not) in its row, columns ascending, zeros at column 0 past the count; to_dense
    gives the residual back. Bug caught: a descending or unstable column order, ±0 kept, padding left as data."""
    x = sparse_residual(9, 40, dtype, seed=1)
    x[3, 7] = math.nan
    r = R.from_dense(x, 1.0)
    want_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert r.vals.dtype == want_dt and r.K == 40
    for i in range(9):
        nz = (x[i] != 0).nonzero().flatten()
        n = int(r.cnt[i])
        assert n == nz.numel() and torch.equal(r.cols[i, :n], nz)
        assert bits_equal(r.vals[i, :n], x[i, nz].to(want_dt))
        assert not r.vals[i, n:].any() and not r.cols[i, n:].any()
    assert bits_equal(r.to_dense(dtype), x.masked_fill(x == 0, 0.0))  # -0 comes back as +0
    assert R.from_dense(torch.ones(4, 8), 0.25) is None  # a row too dense: the caller multiplies dense


def test_references_are_the_products():
    """mm_reference and tmm_reference against the dense products in fp64 (fp32 summation of at most c terms:
    relative error c·2^-24 of the sum of magnitudes). Bug caught: a transposed weight, a column mix-up."""
    x = sparse_residual(12, 50, torch.float32, seed=2)
    w, dy = torch.randn(30, 50), torch.randn(12, 30)
    r = R.from_dense(x, 1.0)
    c = r.vals.shape[1]
    got, want = R.mm_reference(r, w).double(), x.double() @ w.double().t()
    bound = c * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
    assert ((got - want).abs() <= bound).all()
    got, want = R.tmm_reference(dy, r).double(), dy.double().t() @ x.double()
    bound = 12 * 2.0 ** -24 * (dy.double().abs().t() @ x.double().abs())
    assert ((got - want).abs() <= bound).all()


def test_tmm_reference_adds_tokens_in_order():
    """The specified order (each dW entry sums its tokens first to last) spelled out as a Python loop, against
    tmm_reference's index_add_: the order is torch's, not an accident. Bug caught: index_add_ over a column-major
    flattening (tokens interleaved by slot)."""
    x = sparse_residual(40, 6, torch.float32, seed=3, density=0.6)
    dy = torch.randn(40, 5) * torch.exp(torch.empty(40, 5).uniform_(-10, 10))
    r = R.from_dense(x, 1.0)
    want = torch.zeros(6, 5)
    for i in range(40):
        for j in range(int(r.cnt[i])):
            want[r.cols[i, j]] += r.vals[i, j] * dy[i]
    assert bits_equal(R.tmm_reference(dy, r), want.t())


@needs_cc
@settings(max_examples=40, deadline=None)
@given(M=st.integers(0, 40), K=st.integers(1, 90), N=st.integers(1, 150), seed=st.integers(0, 2**16),
       wdt=st.sampled_from(DTYPES), density=st.sampled_from([0.02, 0.2, 1.0]))
def test_kernels_are_the_references(M, K, N, seed, wdt, density):
    """ΔX·Wᵀ and dYᵀ·ΔX from the compiled kernels equal the references bit for bit: any shape (N across the
    kernel's 64-column blocks, empty ΔX rows, M = 0), weight/gradient dtypes, values over 16 decades, infinities
    in W. Bugs caught: terms summed in another order, a block's tail columns dropped, padding slots multiplied in
    (0·inf = NaN)."""
    x = sparse_residual(M, K, torch.float32, seed, density).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * torch.exp(torch.empty(N, K).uniform_(-8, 8, generator=g))).to(wdt)
    w[:, 0] = math.inf  # padding slots point at column 0
    dy = (torch.randn(M, N, generator=g) * 1e3).to(wdt)
    r = R.from_dense(x, 1.0)
    got_mm, got_tmm = OK.ell_mm(r.vals, r.cols, r.cnt, w), OK.ell_tmm(dy, r.vals, r.cols, r.cnt, K)
    assert bits_equal(got_mm, R.mm_reference(r, w)) and bits_equal(got_tmm, R.tmm_reference(dy, r))


@needs_cc
@settings(max_examples=30, deadline=None)
@given(M=st.integers(0, 30), K=st.integers(1, 70), N=st.integers(1, 150), seed=st.integers(0, 2**16),
       ydt=st.sampled_from(DTYPES), wdt=st.sampled_from(DTYPES))
def test_add_mm_is_the_cast_then_the_add(M, K, N, seed, ydt, wdt):
    """residual.add_mm (the kernel adding the product into y in place) equals y + mm(ΔX, W).to(y.dtype) bit for
    bit: y in fp32/bf16/fp16 with infinities and NaN, products that overflow fp16, N across the 64-column blocks
    and their ragged tails. Bugs caught: the product added unrounded (one rounding instead of torch's two), the
    tail columns left out, the plain product stored (y ignored)."""
    g = torch.Generator().manual_seed(seed)
    x = sparse_residual(M, K, torch.float32, seed, 0.2).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * torch.exp(torch.empty(N, K).uniform_(-6, 6, generator=g))).to(wdt)
    y = (torch.randn(M, N, generator=g) * 10).to(ydt)
    if y.numel() > 3:
        y.view(-1)[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    r = R.from_dense(x, 1.0)
    want = y + R.mm_reference(r, w).to(ydt)
    got = y.clone()
    assert OK.ell_mm(r.vals, r.cols, r.cnt, w, y=got) is got and bits_equal(got, want)
    got2 = y.clone()
    assert R.add_mm(got2, r, w) is got2 and bits_equal(got2, want)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_do_not_depend_on_the_thread_count(threads):
    """Threads split output columns, never a sum. Bug caught: a parallel split over tokens in dW's sum."""
    x = sparse_residual(300, 200, torch.bfloat16, seed=4)
    w, dy = torch.randn(700, 200), torch.randn(300, 700)
    r = R.from_dense(x, 1.0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got_mm, got_tmm = OK.ell_mm(r.vals, r.cols, r.cnt, w), OK.ell_tmm(dy, r.vals, r.cols, r.cnt, 200)
        assert bits_equal(got_mm, R.mm_reference(r, w)) and bits_equal(got_tmm, R.tmm_reference(dy, r))
    finally:
        torch.set_num_threads(old)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.999])
@pytest.mark.parametrize("K", [3, 37, 384])
def test_clamp_writes_the_sparse_rows_of_the_eager_residual(monkeypatch, dtype, alpha, K):
    """Per token, the OCC kernel's sparse rows are from_dense of the eager clamp's residual (values, columns,
    counts, padding), with the same clamped x and bounds; rows with NaN or ±inf take the eager route. Bugs
    caught: the residual stored unrounded (not in x's dtype), the padding not cleared."""
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(16, K, generator=g) * torch.exp(torch.empty(16, K).uniform_(-6, 6, generator=g))).to(dtype)
    x[2] = 1.0  # ties
    x[3, : K // 2] = -0.0
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    xc, r, lo, hi = R.clamp(x, alpha, "token", sparse=True)
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    xc_e, res_e, lo_e, hi_e = occ_clamp_rows(x, alpha)
    want = R.from_dense(res_e)
    assert isinstance(r, R.SparseRows) and r.vals.shape[1] >= want.vals.shape[1]
    c = want.vals.shape[1]  # the kernel pads to the most a finite row can hold
    assert torch.equal(r.cnt, want.cnt) and torch.equal(r.cols[:, :c], want.cols)
    assert bits_equal(r.vals[:, :c], want.vals) and not r.vals[:, c:].any()
    assert torch.equal(xc, xc_e) and torch.equal(lo, lo_e) and torch.equal(hi, hi_e)
    x[5, 1] = math.inf  # not finite: the eager clamp, then from_dense
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    _, r_inf, _, _ = R.clamp(x, alpha, "token", sparse=True)
    _, res_inf, _, _ = occ_clamp_rows(x, alpha)
    assert bits_equal(r_inf.to_dense(dtype), res_inf.masked_fill(res_inf == 0, 0.0))
