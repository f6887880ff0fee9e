"""The compiled CPU quantizers (lowbit.kernels) bit for bit against the eager specification (lowbit.quant).

Every comparison runs the same call twice, once under LOWBIT_KERNELS=eager and once under =cpu, on data
with the cases that break quantizers: NaN, ±inf, ±0, fp32 subnormals, all-zero groups, exact ties of the
element grid, values past the format's max, odd shapes, several random-key chunks. "Bit for bit" compares
the raw bit patterns everywhere except NaN, where only NaN-ness is compared (payloads are not numerics).
"""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit.kernels as K
import lowbit.kernels.reduce as KR
from lowbit.kernels import cpu
from lowbit.quant import fake_quantize, fake_quantize_with_scales, quantize
from lowbit.tensor_quant import TensorQuant as T

pytestmark = pytest.mark.skipif(cpu.compiler() is None, reason="no C compiler: the kernels cannot be built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every scale rule and rounding the kernels cover, on every granularity (block sizes small: many groups)
QUANTS = [
    T("e2m1", "tensor"), T("e4m3", "tensor"), T("e5m2", "tensor"), T("e2m1", "row"), T("e1m2", "row"),
    T("e3m0", "row"), T("e5m2", "row"), T("e4m3", "tile", 8), T("e4m3", "block", 4), T("e2m1", "block", 4),
    T("e4m3", "row", reciprocal=True), T("e5m2", "tensor", reciprocal=True),
    T("e2m1", "tile", 8, "e8m0"), T("e2m1", "tile", 8, "e8m0", scale_round="ceil"),
    T("e4m3", "tile", 8, "e8m0", scale_round="ceil", reciprocal=True), T("e5m2", "block", 4, "e8m0"),
    T("e2m1", "tile", 4, "e4m3"), T("e2m1", "tile", 4, "e4m3", reciprocal=True), T("e2m1", "block", 4, "e4m3"),
    T("e2m1", "row", rounding="stochastic"), T("e2m1", "tile", 4, "e4m3", rounding="stochastic"),
    T("e4m3", "tensor", rounding="stochastic"), T("e5m2", "tile", 8, rounding="stochastic"),
    T("e2m1", "tile", 8, "e8m0", scale_mult=4 / 3, rounding="stochastic"),
    T("e5m2", "row", reciprocal=True, scale_mult=1.5), T("e4m3", "tensor", scale_mult=0.75),
    T("e2m1", "tensor", scale_fmt="e4m3"), T("e4m3", "tensor", scale_fmt="e8m0", scale_round="ceil"),
    T("e5m2", "tensor", reciprocal=True, scale_mult=1.5),
    # NVFP4 "4 over 6" (kernels/fos.c): tiles, square blocks, SR (two whole-tensor keys), a scale multiplier
    T("e2m1", "tile", 4, "e4m3", four_over_six=True), T("e2m1", "block", 4, "e4m3", four_over_six=True),
    T("e2m1", "tile", 8, "e4m3", rounding="stochastic", four_over_six=True),
    T("e2m1", "tile", 8, "e4m3", scale_mult=0.75, four_over_six=True),
    # QuEST's σ scales (kernels/quest.c): Quartet's forward quantizer, a scale multiplier
    T("e2m1", "tile", 8, "e8m0", scale_rule="quest"), T("e2m1", "tile", 4, "e8m0", scale_rule="quest", scale_mult=0.5),
]


def qid(q):
    return f"{q.fmt}-{q.granularity}{q.block or ''}-{q.scale_fmt}{'-rcp' if q.reciprocal else ''}" \
           f"{'-ceil' if q.scale_round == 'ceil' else ''}-{q.rounding[:4]}-m{q.scale_mult:g}" \
           f"{'-4over6' if q.four_over_six else ''}{'-quest' if q.scale_rule == 'quest' else ''}"


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    it = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.masked_fill(na, 0).view(it), b.masked_fill(nb, 0).view(it))


def both(monkeypatch, fn):
    """fn() under the eager quantizers, then under the compiled ones."""
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    ref = fn()
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    return ref, fn()


def nasty(shape, dtype, seed=0):
    """Values over 12 decades with every special case sprinkled in, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-14, 14, generator=g))
    flat = x.view(-1)
    n = flat.numel()
    specials = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -3e-39, 2.0 ** -149, 448.0, 57344.0, 1e30,
                0.25, 0.75, 2.5, 5.0, -3.5, 1.5 * 2 ** -9]  # ties of E2M1's and E4M3's grids, subnormals
    idx = torch.randint(0, n, (min(n, 3 * len(specials)),), generator=g)
    for i, j in enumerate(idx.tolist()):
        flat[j] = specials[i % len(specials)]
    if x.dim() == 2 and x.shape[0] > 4:
        x[2] = 0.0  # an all-zero row (and its groups)
        x[3] = 3.0  # a constant row: every element is the group's absmax
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.int32], ids=str)
@pytest.mark.parametrize("shape", [(16, 16), (37, 70), (512, 48), (5, 3), (2, 33)], ids=str)
def test_contiguous_2d_transposes_the_bits(monkeypatch, dtype, shape):
    """kernels.contiguous_2d of a transposed view on CPU (the C tile transpose) is t.contiguous() bit for bit:
    NaN payloads and signs kept (bits, not values, are moved), ragged edges, 2- and 4-byte elements. Catches: a
    tile stored untransposed, the ragged columns skipped, 16-bit elements converted as values (NaN payloads
    lost)."""
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    g = torch.Generator().manual_seed(sum(shape))
    b = torch.randint(-2 ** 30, 2 ** 30, shape, generator=g, dtype=torch.int32)
    b = b if dtype == torch.int32 else b.view(torch.float32).to(dtype) if dtype == torch.float32 else \
        b.to(torch.int16).view(dtype)  # every 16-bit pattern: NaNs with payloads, subnormals
    t = b.t()
    got, it = K.contiguous_2d(t), torch.int16 if t.element_size() == 2 else torch.int32
    assert got.is_contiguous() and torch.equal(got.view(it), t.contiguous().view(it))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 1, 40), (5, 12, 32), (9, 6, 16), (3, 5, 7), (1, 1, 1)], ids=str)
def test_group_absmax_is_the_eager_absmax(monkeypatch, dtype, shape):
    """kernels.reduce.group_absmax (every CPU quantizer's group scales that the fused kernels do not compute,
    DGE's among them) equals torch's max |x| per group bit for bit, NaN where a group holds one, for 1-, 16-, 32-
    and odd-element groups. Catches: a row offset that forgets the groups (r·B instead of r·G·B)."""
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    x3 = nasty(shape, torch.float32, seed=sum(shape)).to(dtype)
    got = KR.group_absmax(x3)
    want = x3.float().abs().amax(-1, keepdim=True)
    assert got is not None and bits_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["finite", "nasty", "strided", "negative"])
def test_tensor_amax_is_the_eager_amax(monkeypatch, dtype, case):
    """Delayed scaling's amax (kernels.reduce.tensor_amax) equals t.abs().amax() for contiguous tensors (the kernel) and
    views (the eager fallback), NaN when t holds one. Catches: the kernel's max without the absolute value (the
    all-negative case), a strided view read as contiguous."""
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    t = {"finite": torch.randn(37, 70), "nasty": nasty((37, 70), torch.float32), "negative": -torch.rand(5, 9),
         "strided": torch.cat([torch.randn(37, 35), torch.full((37, 35), 1e4)], 1)[:, :35]}[case].to(dtype)
    got, want = KR.tensor_amax(t), t.abs().amax().float()
    assert got.dtype == torch.float32 and got.shape == () and bits_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", QUANTS, ids=qid)
def test_fake_quantize_bitwise(monkeypatch, q, dtype):
    x = nasty((16, 24), dtype)
    for name, fn in (("fake_quantize", fake_quantize), ("with_scales", fake_quantize_with_scales)):
        ref, got = both(monkeypatch, lambda fn=fn: fn(x, q, torch.Generator().manual_seed(3)))
        ref, got = (ref, got) if name == "with_scales" else ((ref,), (got,))
        for r, k in zip(ref, got):
            assert bits_equal(r, k), f"{name} {qid(q)} {dtype}: {(r != k).sum()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", QUANTS, ids=qid)
def test_transposed_view_bitwise(monkeypatch, q, dtype):
    """b.t() of a contiguous b is quantized along b's columns, without the transposed copy: the same bits
    and scales as quantizing the copy (what the eager path does), returned as a transposed view."""
    b = nasty((16, 24), dtype, seed=4)
    ref, got = both(monkeypatch, lambda: fake_quantize_with_scales(b.t(), q, torch.Generator().manual_seed(3)))
    assert bits_equal(ref[0], got[0]) and bits_equal(ref[1], got[1])
    if (q.granularity != "tensor" or q.rounding == "nearest") and not q.four_over_six and q.scale_rule == "absmax":
        assert got[0].stride() == (1, 24)  # the column kernel ran (no contiguous copy; 4 over 6 copies)


@pytest.mark.parametrize("q", [q for q in QUANTS if q.granularity != "block"][::2], ids=qid)
def test_finite_inputs_without_specials(monkeypatch, q):
    """The common case on its own (no NaN): a special value can hide a whole group's difference."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 3
    ref, got = both(monkeypatch, lambda: fake_quantize(x, q, torch.Generator().manual_seed(5)))
    assert not got.isnan().any() and bits_equal(ref, got)


@pytest.mark.parametrize("q", [T("e4m3", "tensor"), T("e2m1", "row"), T("e2m1", "block", 4, "e4m3"),
                               T("e5m2", "tile", 8, rounding="stochastic")], ids=qid)
def test_quantize_codes_and_scales(monkeypatch, q):
    x = nasty((8, 16), torch.float32, seed=2)
    ref, got = both(monkeypatch, lambda: quantize(x, q, torch.Generator().manual_seed(7)))
    assert torch.equal(ref.codes, got.codes) and bits_equal(ref.scales, got.scales)


@pytest.mark.parametrize("q", [T("e4m3", "tensor", rounding="stochastic"), T("e2m1", "row", rounding="stochastic"),
                               T("e2m1", "block", 4, "e4m3", rounding="stochastic")], ids=qid)
def test_stochastic_rounding_spans_several_random_chunks(monkeypatch, q):
    """More elements than one chunk (2^20): each chunk draws its own key, in order, like rng.uniform; the
    generator ends in the same state."""
    base = torch.randn(1028, 1100, generator=torch.Generator().manual_seed(0))
    for x in (base, base.t()):  # the row kernel, and the column kernel (chunks of the transposed copy's rows)
        gens = []

        def run(x=x, gens=gens):
            gens.append(torch.Generator().manual_seed(11))
            return fake_quantize(x, q, gens[-1])

        ref, got = both(monkeypatch, run)
        assert bits_equal(ref, got)
        assert torch.equal(gens[0].get_state(), gens[1].get_state())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_empty_and_amax_given(monkeypatch, fmt):
    q = T(fmt, "tensor")
    ref, got = both(monkeypatch, lambda: fake_quantize(torch.empty(0, 8), q))
    assert got.shape == (0, 8)
    x = nasty((6, 10), torch.bfloat16)
    for amax in (1.0, -2.0, 0.0, 1e-30, math.inf):  # delayed scaling (a negative amax: its magnitude): values past amax saturate, e5m2 keeps ±inf
        ref, got = both(monkeypatch, lambda amax=amax: fake_quantize(x, q, amax=torch.tensor(amax)))
        assert bits_equal(ref, got), amax
        if fmt == "e5m2" and amax == 1.0:
            assert got.isinf().any()  # the input's infinities survived, so the test sees that path


@pytest.mark.parametrize("q", QUANTS, ids=qid)
def test_tiny_groups(monkeypatch, q):
    """Groups whose absmax is subnormal or near it: the scale floors (fp32's 2^-126, E8M0's 2^-127,
    E4M3's 2^-9) decide the result."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 16, generator=g) * torch.logspace(-45, -30, 16)
    ref, got = both(monkeypatch, lambda: fake_quantize(x, q, torch.Generator().manual_seed(1)))
    assert bits_equal(ref, got)


@pytest.mark.parametrize("q", [T("e2m1", "tile", 4, "e4m3"), T("e2m1", "tile", 4, "e4m3", reciprocal=True),
                               T("e2m1", "block", 4, "e4m3", reciprocal=True, scale_mult=4 / 3)], ids=qid)
def test_nvfp4_tensor_scale_over_decades(monkeypatch, q):
    """NVFP4's tensor scale is one number per tensor: sweep it over 60 decades so its fp32 rounding
    (TE's g = 2688 · (1/t) vs 2688 / t) shows."""
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(8))
    for k, t in enumerate(torch.logspace(-30, 30, 97).tolist()):
        x = x0 * t * (1 + k / 97)
        ref, got = both(monkeypatch, lambda x=x: fake_quantize(x, q))
        assert bits_equal(ref, got), t


_fmt = st.sampled_from(QUANTS)


@settings(max_examples=60, deadline=None)
@given(q=_fmt, dtype=st.sampled_from(DTYPES), rows=st.integers(1, 3), cols=st.integers(1, 4),
       transpose=st.booleans(), data=st.data())
def test_property_bitwise(q, dtype, rows, cols, transpose, data):
    """Any values (NaN, inf, subnormals, ties, huge), any shape the granularity allows, every dtype, as a
    contiguous tensor or a transposed view."""
    b = q.block or 1
    shape = (rows * b, cols * b)
    arr = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=True,
                                                                      allow_infinity=True, allow_subnormal=True)))
    x = torch.from_numpy(arr).to(dtype)
    x = x.t() if transpose else x
    with pytest.MonkeyPatch.context() as mp:
        ref, got = both(mp, lambda: fake_quantize(x, q, torch.Generator().manual_seed(1)))
    assert bits_equal(ref, got), (qid(q), x, ref, got)


def test_modes_and_errors(monkeypatch):
    x = torch.randn(4, 8)
    q = T("e4m3", "row")
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    assert not K.applies(x, q) and K.which() == "eager"
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    assert K.applies(x, q) and K.which() == "cpu"
    assert K.applies(x, T("e2m1", "tile", 4, "e8m0", scale_rule="quest"))  # kernels/quest.c
    assert not K.applies(x, T("e2m1", "row", None, "e8m0", scale_rule="quest"))  # 8: eager (rows: any length)
    assert K.applies(x, T("e2m1", "tile", 4, "e4m3", four_over_six=True))  # kernels/fos.c
    for q6 in (T("e2m1", "tensor", scale_fmt="e4m3", four_over_six=True),  # one group: torch's own sum order
               T("e2m1", "tile", 12, "e4m3", four_over_six=True)):  # not a power of two: likewise
        assert not K.applies(torch.randn(4, 12), q6)
    assert K.which("cuda") == ("triton" if K._triton() is not None else "eager") and K.which("mps") == "eager"
    monkeypatch.setenv("LOWBIT_KERNELS", "auto")
    if K._triton() is not None:  # triton importable: "auto" says triton on CUDA unless the self-check failed there
        assert K.which("cuda") == "triton"
        monkeypatch.setattr(K, "_GPU_CHECKED", {"cuda:0": "they failed"})
        assert K.which("cuda") == "eager"  # (bug caught: result.json saying triton for an eager run)
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    assert K.which("cuda") == "eager"
    monkeypatch.setenv("LOWBIT_KERNELS", "fast")
    with pytest.raises(ValueError, match="not one of auto, eager, cpu, triton"):
        fake_quantize(x, q)


def test_no_compiler_falls_back_once_and_cpu_mode_says_why(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "_LIB", [])
    monkeypatch.setattr(cpu, "_WHY", [])
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    monkeypatch.setenv("LOWBIT_KERNELS", "auto")
    x = torch.randn(4, 8)
    q = T("e4m3", "row")
    a, b = fake_quantize(x, q), fake_quantize(x, q)  # eager, same numbers
    assert bits_equal(a, b) and K.which() == "eager"
    err = capsys.readouterr().err
    assert err.count("no C compiler found") == 1 and "eager" in err
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match="install gcc"):
        fake_quantize(x, q)


def test_build_compiles_every_source_and_reports_a_failure(monkeypatch, tmp_path, capsys):
    """The parallel build (one compiler per source, then a link) produces a library exporting every source's
    entry points; a source that does not compile falls back to eager with the compiler's message (bugs caught:
    a source left out of the link; a failed compile step ignored, loading a stale or partial library)."""
    cc, lib = cpu.compiler(), cpu.library()  # built by the same _build (cached once per machine)
    assert all(hasattr(lib, f) for f in ("lb_quant_groups", "lb_quant_fos", "lb_quest_scales", "lb_rotate",
                                         "lb_operand_stats", "lb_occ_rows", "lb_dge_apply", "lb_ell_mm"))
    bad = tmp_path / "bad.c"
    bad.write_text("int broken(void) { return undeclared_name; }\n")
    monkeypatch.setattr(cpu, "SOURCES", [cpu.SOURCES[-1], bad])  # small: the failure, not a full build
    with pytest.raises(RuntimeError, match="undeclared_name"):
        cpu._build(cc, tmp_path / "bad" / "lib.so")
    assert not (tmp_path / "bad" / "lib.so").exists()
    monkeypatch.setattr(cpu, "_LIB", [])
    monkeypatch.setattr(cpu, "_WHY", [])
    monkeypatch.setattr(cpu, "cache_root", lambda: tmp_path / "cache")
    assert cpu.library() is None and "undeclared_name" in cpu.why()
    assert "using the eager PyTorch quantizers" in capsys.readouterr().err


def test_build_key_tracks_source_compiler_and_cpu(monkeypatch):
    cc = cpu.compiler()
    k = cpu.build_key(cc)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: "flags : sse2")
    assert cpu.build_key(cc) != k
    monkeypatch.setattr(cpu, "FLAGS", cpu.FLAGS + ["-DX"])
    assert len({k, cpu.build_key(cc)}) == 2


@pytest.mark.parametrize("fmt,gran", list(itertools.product(["e4m3", "e2m1"], ["row", "tile"])))
def test_threads_do_not_change_results(monkeypatch, fmt, gran):
    q = T(fmt, gran, 16 if gran == "tile" else 0, rounding="stochastic")
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(4))
    n = torch.get_num_threads()
    monkeypatch.setenv("LOWBIT_KERNELS", "cpu")
    try:
        torch.set_num_threads(1)
        a = fake_quantize(x, q, torch.Generator().manual_seed(2))
        torch.set_num_threads(max(2, n))
        b = fake_quantize(x, q, torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(n)
    assert bits_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q", [T("e4m3", "tensor"), T("e2m1", "row"), T("e2m1", "tile", 8, "e4m3"),
                               T("e5m2", "tensor", scale_mult=0.5)], ids=qid)
@pytest.mark.parametrize("view", ["contiguous", "transposed", "every 3rd row"])
def test_operand_stats_match_the_eager_statistics(monkeypatch, q, dtype, view):
    """The one-pass statistics against lowbit.nn.stats.operand_stats: counts (nonfinite, underflow,
    saturated) exactly; rel_err and sqnr_db to 1e-5 relative (double vs fp32 sums: the summation order and
    precision differ, nothing else). Saturation shows with scale_mult 0.5 (values beyond max)."""
    from lowbit.formats import get_format
    from lowbit.nn.stats import operand_stats

    b = nasty((24, 32), dtype, seed=9).masked_fill(torch.rand(24, 32, generator=torch.Generator().manual_seed(2))
                                                  < 0.3, 1e-30)  # values that underflow
    # no finite |value| whose square overflows fp32 (1e30 in nasty()): there the eager fp32 norms give inf/inf =
    # NaN and the double sums a finite rel_err
    b = torch.where(b.float().abs() > 1e15, b.float().sign() * 1e15, b.float()).to(dtype).masked_fill(b.isinf(), math.inf)
    if q.scale_mult != 1:  # finite, so the tensor scale is too and values past max saturate
        b = torch.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
    t = b.t().contiguous().t() if view == "transposed" else b
    k = 3 if view == "every 3rd row" else 1
    tq, scales = fake_quantize_with_scales(t, q)
    got = K.operand_stats(t, tq, q, get_format(q.fmt).max, scales, k)
    ss = scales if q.granularity == "tensor" or k == 1 else scales[::k]
    from lowbit.quant import divide_by_scales
    ts, tqs = t[::k], tq[::k]
    ref = operand_stats(ts, tqs.clone(), q, divide_by_scales(ts, q, ss), scales)
    for name in ("nonfinite", "underflow", "saturated", "amax"):
        assert bits_equal(got[name], ref[name].float()), name
    for name in ("rel_err", "sqnr_db"):
        torch.testing.assert_close(got[name], ref[name].float(), rtol=1e-5, atol=0, equal_nan=True)
    if q.scale_mult == 0.5 and k == 1:
        assert got["saturated"] > 0


def test_operand_stats_finite_values():
    """Without specials the error statistics are finite numbers (the NaN-filled cases above compare NaN)."""
    from lowbit.formats import get_format
    from lowbit.nn.stats import operand_stats
    from lowbit.quant import divide_by_scales

    q = T("e2m1", "row")
    t = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    tq, scales = fake_quantize_with_scales(t, q)
    got = K.operand_stats(t, tq, q, get_format("e2m1").max, scales, 1)
    ref = operand_stats(t, tq.clone(), q, divide_by_scales(t, q, scales), scales)
    assert 0 < float(got["rel_err"]) < 1
    torch.testing.assert_close(got["rel_err"], ref["rel_err"], rtol=1e-5, atol=0)


def _zero_sign_free(t: torch.Tensor) -> torch.Tensor:
    return t + 0.0  # -0 + 0 = +0: the one difference the OCC kernel may show (see kernels.occ_rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.999, 1.0, 0.7])  # 0.7, K=256: tails over 64, quickselect
@pytest.mark.parametrize("K", [1, 3, 37, 256])
def test_occ_rows_match_the_eager_clamp(monkeypatch, dtype, alpha, K):
    """Per-token OCC (order statistics, clamp, residual) against estimators.occ_clamp_rows run eager: NaN rows
    (NaN sorts last), infinities, ties, zeros of both signs, one-element rows."""
    from lowbit.estimators import occ_clamp_rows

    x = nasty((9, K), dtype, seed=K)
    if K >= 3:
        x[4] = 1.0  # all ties
        x[5, : K // 2] = -0.0
        x[6] = math.nan
        x[7, 2:] = math.nan  # a NaN lower bound (sorted[i_lo] is NaN) for alpha 0.9: every entry becomes NaN
    ref, got = both(monkeypatch, lambda: occ_clamp_rows(x, alpha))
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        assert bits_equal(_zero_sign_free(r), _zero_sign_free(g))


def test_occ_rows_quickselect_on_many_shapes(monkeypatch):
    """Tails over 64 entries take the quickselect path: random widths, alphas and heavy ties (values from a
    handful of integers), against the eager topk."""
    from lowbit.estimators import occ_clamp_rows

    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        K = int(torch.randint(130, 400, (1,), generator=g))
        alpha = [0.55, 0.6, 0.7][int(torch.randint(0, 3, (1,), generator=g))]
        x = torch.randint(-4, 5, (16, K), generator=g).float() * torch.rand(16, 1, generator=g)
        x[::2] += torch.randn(8, K, generator=g)  # half the rows without ties
        ref, got = both(monkeypatch, lambda x=x, alpha=alpha: occ_clamp_rows(x, alpha))
        for r, k in zip(ref, got):
            assert bits_equal(_zero_sign_free(r), _zero_sign_free(k)), (K, alpha)


@pytest.mark.parametrize("alpha", [0.99, 0.97, 0.9])
def test_occ_rows_with_the_tails_in_one_lane(monkeypatch, alpha):
    """The kernel's order statistics keep each of 16 lanes' few smallest (largest) keys and take the answer from
    them unless a lane's share could hide one: rows whose extremes all sit in one lane (positions ≡ 3 mod 16) force
    the exact second pass, rows whose extremes spread do not; both against the eager topk. Bug caught: the
    shortcut taken without checking the lanes (every hidden extreme missed)."""
    from lowbit.estimators import occ_clamp_rows

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1536, generator=g)
    x[:3, 3::16] = torch.linspace(-60, -20, 96)  # the 96 smallest of three rows in lane 3
    x[3:, 7::16] = torch.linspace(20, 60, 96)  # the 96 largest of three rows in lane 7
    ref, got = both(monkeypatch, lambda: occ_clamp_rows(x, alpha))
    for r, k in zip(ref, got):
        assert bits_equal(_zero_sign_free(r), _zero_sign_free(k))


RECIPES = ["fp8-tensor", "fp8-tensor-delayed", "fp8-block", "fp8-rowwise", "mxfp8", "fp4-direct", "fp4-paper",
           "fp4-paper-allfp4", "mxfp4", "nvfp4", "nvfp4-4over6", "quartet"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_layer_step_is_the_same_with_and_without_kernels(monkeypatch, name):
    """A QLinear forward and backward (bf16 autocast, two calls: delayed scaling's history, the layer's random
    streams) gives the same Y, dX, dW, db bit for bit with the compiled kernels and with the eager code."""
    from lowbit.nn import QLinear

    def step():
        torch.manual_seed(0)
        q = QLinear.from_linear(torch.nn.Linear(64, 96), name)
        x = torch.randn(48, 64, requires_grad=True)
        g = torch.randn(48, 96)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = q(x)
            y.float().backward(g)
        return y.detach(), x.grad, q.weight.grad, q.bias.grad

    ref, got = both(monkeypatch, step)
    for r, k in zip(ref, got):
        assert bits_equal(r, k)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dw_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,k,clamp", [("e2m1", 5.0, 3.0), ("e4m3", 3.0, 10.0), ("e1m2", 5.0, 3.0),
                                         ("e2m1", 0.7, 3.0), ("e2m1", 1.0, 3.0)])  # 1/k − 1 > 0, = 0
def test_dge_apply_matches_the_eager_derivative(monkeypatch, layout, dw_dtype, fmt, k, clamp):
    """DGE's factor on dW (estimators.dge_apply) with and without the kernels, bit for bit: grid points (t = 1
    and t = 0, where the derivative is clamped), values past max, NaN, ±inf, both layouts of the scaled weight,
    exponents 1/k − 1 below, at and above 0, and a size the kernel splits across threads. Bugs caught: a
    polynomial constant or operation order not lowbit.powers', a contraction into an FMA."""
    from lowbit.estimators import dge_apply
    from lowbit.formats import get_format

    g = torch.Generator().manual_seed(3)
    R, C = 300, 260
    ws = torch.randn(R, C, generator=g) * get_format(fmt).max / 2
    ws.view(-1)[:6] = torch.tensor([0.5, 1.25, 1e9, math.nan, -math.inf, -0.0])  # on the grid, midway, past max
    ws = ws.t().contiguous().t() if layout == "transposed" else ws
    dw = torch.randn(R, C, generator=g).to(dw_dtype)
    ref, got = both(monkeypatch, lambda: dge_apply(dw, ws, fmt, k, clamp))
    assert got.dtype == torch.float32 and bits_equal(ref, got)


@pytest.mark.parametrize("q", [T("e2m1", "row"), T("e2m1", "row", reciprocal=True), T("e4m3", "tensor"),
                               T("e2m1", "row", scale_fmt="e8m0")], ids=qid)
@pytest.mark.parametrize("with_add", [False, True])
def test_dge_epilogue_is_the_eager_composition(monkeypatch, q, with_add):
    """The weight-gradient epilogue in one pass, (dW + OCC's compensation) · f'(W / s) with the scales computed
    from W as the forward did, against the eager steps (add, quant.scaled_values, dge_apply) bit for bit: row and
    tensor scales, dividing and multiplying rules, −0 in dW without a compensation. Bugs caught: the encode factor
    divided instead of multiplied, +0 added when there is nothing to add (−0 → +0), a scale taken from the wrong
    row."""
    from lowbit.estimators import dge_apply
    from lowbit.formats import get_format
    from lowbit.kernels import dge as D
    from lowbit.quant import scale_factors, scaled_values

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(37, 70, generator=g) * torch.rand(37, 1, generator=g) * 3).to(torch.bfloat16)
    dw = torch.randn(37, 70, generator=g).to(torch.bfloat16)
    dw[0, :4] = -0.0
    add = torch.randn(37, 70, generator=g) * 1e-3 if with_add else None
    got = D.dge_epilogue(dw, add, w, *scale_factors(w, q), get_format(q.fmt), 5.0, 3.0)
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    base = dw.float() if add is None else dw.float() + add
    want = dge_apply(base, scaled_values(w, q)[0], q.fmt, 5.0, 3.0)
    assert got is not None and bits_equal(got, want)


@pytest.mark.parametrize("name", sorted(__import__("lowbit.recipes", fromlist=["names"]).names()))
def test_a_model_training_step_is_the_same_with_and_without_kernels(monkeypatch, name):
    """A whole model (tiny GPT, 2 layers, every recipe as the trainer applies it, statistics collected) takes two
    AdamW steps under bf16 autocast: the weights after them are bit for bit equal with the compiled kernels and
    with the eager code."""
    from lowbit import recipes
    from lowbit.models import build_model
    from lowbit.nn import collect_stats
    from lowbit.train.runtime import apply_recipe

    recipe = recipes.get(name)

    def train_two_steps():
        torch.manual_seed(0)
        model = apply_recipe(build_model("tiny", vocab_size=64, n_layer=2, n_embd=64, n_head=2), recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
        for step in range(2):
            collect_stats(model, step == 1)  # the second step is a statistics step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.compute_dtype == "bf16"):
                out = model(idx)
            logits = out[0] if isinstance(out, tuple) else out
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten()).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    ref, got = both(monkeypatch, train_two_steps)
    assert len(ref) == len(got) and all(bits_equal(r, g) for r, g in zip(ref, got))


def same_fp8(codes: torch.Tensor, values: torch.Tensor, fmt: str) -> bool:
    """uint8 codes equal torch's float8 cast of the (on-grid) fp32 values, bit for bit; any two NaN codes match
    (a NaN's sign bit is the hardware's choice)."""
    ref = values.to({"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt])
    got = codes.view(ref.dtype)
    nan_r, nan_g = ref.float().isnan(), got.float().isnan()
    return torch.equal(nan_r, nan_g) and torch.equal(codes[~nan_g], ref.view(torch.uint8)[~nan_r])


def edges(dtype) -> tuple[torch.Tensor, ...]:
    """[8, 24] tensors for rules nasty() does not reach: groups 2^30 below the tensor's absmax (NVFP4's group scale
    rounds to 0 in E4M3 and is raised to 2^-9), an inf with no NaN (NVFP4: the tensor scale becomes NaN),
    groups so small that amax / fmax is an fp32 subnormal (E8M0 ceil's two smallest scales), and a tensor of
    fp32 subnormals (NVFP4's tensor scale underflows to 0 and is replaced by 1)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 24, generator=g)
    wide = base * torch.where(torch.arange(24) < 8, 1e6, 1e-3)
    with_inf = base.clone()
    with_inf[3, 5] = math.inf
    tiny = base * torch.logspace(-41, -35, 24)
    tiny[0, 8:16] = torch.linspace(1e-39, 5e-38, 8)  # amax / 6 between 2^-127 and 2^-126
    tiny[1, 8:16] = -torch.linspace(1e-37, 4e-36, 8)  # amax / 448 likewise
    subnormal = base * 1e-43  # NVFP4: absmax / (6 · 448) underflows to 0, the tensor scale becomes 1
    return tuple(t.to(dtype) for t in (wide, with_inf, tiny, subnormal))


def check_triton_cases(device: str) -> int:
    """Every configuration the Triton fake-quantize covers, fp32 and bf16, on `device` (CPU tensors under
    TRITON_INTERPRET=1, or a CUDA GPU): bit for bit the eager quantizer on the same tensors, values and scales.
    Returns how many configurations ran."""
    import os

    from lowbit.formats import get_format
    from lowbit.kernels import triton_quant
    from lowbit.quant import _run, fake_quantize_with_scales

    n = 0
    for dtype in (torch.float32, torch.bfloat16):
        for q in QUANTS:
            # nasty() values, and rows of near-ties: E2M1 midpoints times each row's scale, rounded to fp32, so
            # x / s lands a last bit either side of a tie (where x * (1 / s) would round differently)
            mid = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 3)
            ties = (torch.rand(256, 1, generator=torch.Generator().manual_seed(0)) * 100 + 1) * mid / 6
            for amax in ((None, 1.0, 0.0, float("inf")) if q.granularity == "tensor" else (None,)):
                if not triton_quant.applies(torch.empty(0, dtype=dtype), q, amax):
                    continue
                # quant._run's rule: the clamp is needed unless fp32 current scaling by division
                sat = not (q.scale_fmt == "fp32" and amax is None and not q.reciprocal and q.scale_mult >= 1)
                for x in (nasty((16, 24), dtype, seed=7), ties.to(dtype), -ties.to(dtype), *edges(dtype)):
                    x = x.to(device)
                    os.environ["LOWBIT_KERNELS"] = "triton"
                    out, sc = K.run_triton(x, q, get_format(q.fmt), amax, sat)  # what CUDA tensors run
                    os.environ["LOWBIT_KERNELS"] = "eager"
                    ref, rs = fake_quantize_with_scales(x.cpu(), q, amax=amax)  # the CPU's eager: the spec
                    assert bits_equal(out.cpu(), ref) and bits_equal(sc.cpu(), rs), (qid(q), dtype, amax)
                    os.environ["LOWBIT_KERNELS"] = "triton"  # quantize()'s rounded values (codes), fp32
                    out, sc = K.run_triton(x, q, get_format(q.fmt), amax, sat, dequant=False)
                    os.environ["LOWBIT_KERNELS"] = "eager"
                    ref, rs = _run(x.cpu(), q, None, amax, dequant=False)
                    assert bits_equal(out.cpu(), ref) and bits_equal(sc.cpu(), rs), (qid(q), dtype, amax, "values")
                    if q.fmt in ("e4m3", "e5m2"):  # the FP8 codes written by the kernel, as quantize() casts them
                        os.environ["LOWBIT_KERNELS"] = "triton"
                        codes, _ = K.run_triton(x, q, get_format(q.fmt), amax, sat, dequant=False, codes=True)
                        os.environ["LOWBIT_KERNELS"] = "eager"
                        assert same_fp8(codes.cpu(), ref, q.fmt), (qid(q), dtype, amax, "codes")
                n += 1
    return n + _check_scaled_cases(device)


def _check_scaled_cases(device: str) -> int:
    """quant._run's CUDA path for the rules whose scales stay eager (block, E8M0 ceil, NVFP4, scale_mult, delayed):
    its scales, then triton_quant.quantize_scaled, bit for bit the CPU's eager quantizer (values and codes)."""
    from lowbit.formats import get_format
    from lowbit.groups import as3d
    from lowbit.kernels import triton_quant
    from lowbit.group_amax import scales3 as _scales3
    from lowbit.quant import _run

    # rows of near-ties (E2M1 midpoints times a row scale): where x · (1/s) and x / s round apart
    mid = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 3)
    ties = (torch.rand(256, 1, generator=torch.Generator().manual_seed(0)) * 100 + 1) * mid / 6
    n = 0
    for dtype, q in itertools.product((torch.float32, torch.bfloat16), QUANTS):
        if q.rounding != "nearest" or not triton_quant.scaled_applies(torch.empty(0, dtype=dtype), q):
            continue
        fmt = get_format(q.fmt)
        for amax, dequant in itertools.product((None, 0.5) if q.granularity == "tensor" else (None,), (True, False)):
            sat = not (q.scale_fmt == "fp32" and amax is None and not q.reciprocal and q.scale_mult >= 1)
            for x in (nasty((16, 24), dtype, seed=3), ties.to(dtype)):
                x = x.to(device)
                x3 = as3d(x, q)
                s3, e3 = _scales3(x3, q, fmt, amax)
                out = torch.empty(x.shape, dtype=dtype if dequant else torch.float32, device=device)
                triton_quant.quantize_scaled(x3, s3, e3, fmt, sat, out.view(x3.shape), dequant)
                ref, _ = _run(x.cpu(), q, None, amax, dequant)
                assert bits_equal(out.cpu(), ref), (qid(q), dtype, amax, dequant)
                if not dequant and q.fmt in ("e4m3", "e5m2"):
                    codes = torch.empty(x.shape, dtype=torch.uint8, device=device)
                    triton_quant.quantize_scaled(x3, s3, e3, fmt, sat, codes.view(x3.shape), False)
                    assert same_fp8(codes.cpu(), ref, q.fmt), (qid(q), dtype, amax, "codes")
            n += 1
    return n


def check_transpose(device: str) -> None:
    """triton_quant.transpose (the hardware GeMMs' transposed operands: FP8 codes, bf16, fp32) equals torch's
    x.t().contiguous() bit for bit (NaN payloads included) on shapes that are empty, one element, narrower than a
    tile, not multiples of the 64x64 tile, and several tiles wide. Bugs caught: the store's mask not transposed
    with the tile (rows past R written, or lost), R and C swapped in the output's row stride."""
    from lowbit.kernels import triton_quant
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float32):
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[torch.empty(0, dtype=dtype).element_size()]
        for r, c in [(0, 5), (1, 1), (3, 70), (130, 65), (64, 192), (200, 1)]:
            x = torch.randint(-128, 128, (r, c), generator=g, dtype=torch.int32).to(bits).to(device)
            got = triton_quant.transpose(x.view(dtype))
            assert got.dtype == dtype and torch.equal(got.view(bits), x.t().contiguous()), (dtype, r, c)


TRITON_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton_quant defines its kernel: the interpreter runs it on CPU
sys.path.insert(0, sys.argv[1])
import torch
from test_kernels import check_transpose, check_triton_cases
from lowbit import kernels
from lowbit.kernels import triton_quant

print("checked", check_triton_cases("cpu"))
check_transpose("cpu")

# the first-use self-check passes here, and a kernel that is off by one bit is caught and turned off, said once
os.environ["LOWBIT_KERNELS"] = "triton"
assert kernels._gpu_self_check(torch.device("cpu"))
real = triton_quant.quantize_tensor
triton_quant.quantize_tensor = lambda *a: (lambda o, s: (o * 1.0000001, s))(*real(*a))
kernels._GPU_CHECKED.clear()
assert not kernels._gpu_self_check(torch.device("cpu")) and not kernels._gpu_self_check(torch.device("cpu"))
"""


def _triton_variants():
    """(kernel, signature, constexprs) for every specialisation the launchers in triton_quant can ask for."""
    from lowbit.kernels import triton_quant as tq

    def outs(bf16):  # (DEQUANT, OUT): fake-quantized in the input dtype, or fp32 values / E4M3 / E5M2 codes
        return [(True, 1 if bf16 else 0), (False, 0), (False, 2), (False, 3)]
    for bf16, use_e, sat, inf in itertools.product((False, True), repeat=4):
        for deq, out in outs(bf16)[:2]:  # (the codes' store is the same helper the other two kernels compile)
            p, o = "*bf16" if bf16 else "*fp32", {0: "*fp32", 1: "*bf16"}.get(out, "*u8")
            sig = {"x_ptr": p, "out_ptr": o, "s_ptr": "*fp32", "e_ptr": "*fp32", "n": "i32", "B": "i32",
                   "G": "i32", "PER_ROW": "constexpr", "BLOCK": "constexpr", "fmax": "fp32", "min_normal": "fp32",
                   "k": "fp32", "USE_E": "constexpr", "BF16": "constexpr", "SAT": "constexpr", "INF": "constexpr",
                   "DEQUANT": "constexpr", "OUT": "constexpr"}
            yield tq._quant_scaled, sig, {"PER_ROW": use_e, "BLOCK": 1024, "USE_E": use_e, "BF16": bf16,
                                          "SAT": sat, "INF": inf, "DEQUANT": deq, "OUT": out}
    rule_sat = [(0, False), (0, True), (1, False), (1, True), (2, True), (3, True), (4, True)]  # E8M0/NVFP4 clamp
    for bf16, (rule, sat) in itertools.product((False, True), rule_sat):
        for deq, out in outs(bf16):
            p, o = "*bf16" if bf16 else "*fp32", {0: "*fp32", 1: "*bf16"}.get(out, "*u8")
            sig = {"x_ptr": p, "out_ptr": o, "s_ptr": "*fp32", "st_ptr": "*fp32", "n_groups": "i32", "B": "constexpr",
                   "BP": "constexpr", "GB": "constexpr", "fmax": "fp32", "min_normal": "fp32", "k": "fp32",
                   "c_emax": "fp32", "RULE": "constexpr", "BF16": "constexpr", "SAT": "constexpr",
                   "DEQUANT": "constexpr", "OUT": "constexpr"}
            yield tq._fake_quant_groups, sig, {"B": 24, "BP": 32, "GB": 64, "RULE": rule, "BF16": bf16, "SAT": sat,
                                               "DEQUANT": deq, "OUT": out}
    for bf16, rule, mult in itertools.product((False, True), range(5), (False, True)):
        for deq, out in (outs(bf16)[0], outs(bf16)[2]):
            p, o = "*bf16" if bf16 else "*fp32", {0: "*fp32", 1: "*bf16"}.get(out, "*u8")
            sig = {"x_ptr": p, "out_ptr": o, "a_ptr": "*fp32", "s_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr",
                   "fmax": "fp32", "min_normal": "fp32", "k": "fp32", "c_emax": "fp32", "mult": "fp32",
                   "RULE": "constexpr", "MULT": "constexpr", "BF16": "constexpr", "SAT": "constexpr",
                   "INF": "constexpr", "DEQUANT": "constexpr", "OUT": "constexpr"}
            yield tq._quant_tensor, sig, {"BLOCK": 1024, "RULE": rule, "MULT": mult, "BF16": bf16, "SAT": True,
                                          "INF": rule == 1, "DEQUANT": deq, "OUT": out}
    for p in ("*u8", "*i16", "*i32"):
        yield tq._transpose, {"x_ptr": p, "out_ptr": p, "R": "i32", "C": "i32", "BR": "constexpr",
                              "BC": "constexpr"}, {"BR": 64, "BC": 64}


def test_triton_kernels_compile_for_hopper_without_fma():
    """Every specialisation of the Triton kernels compiled to PTX for sm_90 with the launch options the code uses
    (no GPU needed: Triton's compiler and the ptxas it ships run on CPU), and no fused multiply-add in the PTX.
    Bugs caught, both seen on an H200 and invisible to the interpreter: a helper with a return per branch (bf16
    and fp32 return types) fails to compile; Triton's default FP fusion turns x·e + c into one fma."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit.kernels import triton_quant as tq
    n = 0
    for fn, sig, const in _triton_variants():
        names = list(sig)
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(tq.OPTIONS)).asm["ptx"]
        assert "fma." not in ptx, (fn.__name__, const)
        if fn is tq._fake_quant_groups and const["RULE"] == 0:
            assert "div.rn.f32" in ptx  # the divide rule divides correctly rounded, not div.full/approx
        n += 1
    assert n == 131


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
def test_triton_kernel_bitwise_on_the_gpu(monkeypatch):
    """The compiled Triton kernels on a real GPU, bit for bit the eager quantizer run by torch on the same GPU
    (the interpreter test checks the algorithm; this one the compiler and the hardware's division, rounding and
    bf16 store), and the first-use self-check passes there."""
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWBIT_KERNELS", "eager")
    assert check_triton_cases("cuda") >= 60
    check_transpose("cuda")
    monkeypatch.setenv("LOWBIT_KERNELS", "triton")
    monkeypatch.setattr(K, "_GPU_CHECKED", {})
    assert K._gpu_self_check(torch.device("cuda"))


def test_triton_kernel_bitwise_under_the_interpreter(tmp_path):
    """The Triton fake-quantize (GPU) run by Triton's interpreter on CPU tensors, bit for bit the eager quantizer
    for every configuration it covers, fp32 and bf16, on nasty() data (in a subprocess: TRITON_INTERPRET must
    be set before the kernel is defined). Bug caught e.g.: Triton's approximate `/` for div_rn, or bf16 output
    through the float conversion (checked by mutation)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = tmp_path / "check.py"
    script.write_text(TRITON_CHECK)
    r = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("checked")[1]) >= 60  # the covered configurations really ran
    assert r.stderr.count("Triton quantization kernels are off on cpu: they differ from the eager quantizer") == 1


def test_gpu_self_check_turns_failing_triton_kernels_off(monkeypatch, capsys):
    """Without the interpreter a Triton launch on CPU tensors fails: the first-use check catches it, turns the
    kernels off for that device and says so once (on a GPU the same path guards against a driver or Triton
    version that miscompiles)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWBIT_KERNELS", "triton")
    monkeypatch.setattr(K, "_GPU_CHECKED", {})
    assert not K._gpu_self_check(torch.device("cpu")) and not K._gpu_self_check(torch.device("cpu"))
    assert capsys.readouterr().err.count("Triton quantization kernels are off on cpu: they failed") == 1


def _quest_exponents(x: np.ndarray, pairwise: bool) -> np.ndarray:
    """floor(log2(c·std + 1e-8)) per row of fp32 x [N, B], the sums pairwise or left to right (numpy, fp32)."""
    from lowbit.scales import QUEST_CLIP

    def total(v):
        if pairwise:
            while v.shape[1] > 1:
                v = v[:, 0::2] + v[:, 1::2]
            return v[:, 0]
        acc = v[:, 0].copy()
        for i in range(1, v.shape[1]):
            acc = acc + v[:, i]
        return acc
    n = np.float32(x.shape[1])
    mean = total(x) / n
    std = np.sqrt(total(x * x) / n - mean * mean)
    t = std * np.float32(QUEST_CLIP / 6.0) + np.float32(1e-8)
    return np.frexp(t)[1] - 1


@pytest.mark.parametrize("B", [8, 32, 64])
def test_quest_scale_sums_pairwise(monkeypatch, B):
    """Groups whose std sits within an ulp of a power of two, where summing left to right gives another scale
    than the pairwise order: the kernel gives the eager (pairwise) scale, on its scalar (8) and vector (32, 64)
    paths (bugs caught: quest.c pairing other elements; a lane permute of the vector tree off by one level)."""
    from lowbit.scales import QUEST_CLIP
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400_000 // B, B)).astype(np.float32)
    std = x.astype(np.float64).std(1)
    x = (x * 2.0 ** rng.integers(-3, 3, (len(x), 1)) / (std * QUEST_CLIP / 6.0)[:, None]).astype(np.float32)
    pick = np.nonzero(_quest_exponents(x, True) != _quest_exponents(x, False))[0][:16]
    assert len(pick) >= 4  # the data really discriminates the two orders
    t = torch.from_numpy(x[pick])
    q = T("e2m1", "tile", B, "e8m0", scale_rule="quest")
    ref, got = both(monkeypatch, lambda: fake_quantize_with_scales(t, q))
    assert torch.equal(ref[1].log2().view(-1), torch.from_numpy(_quest_exponents(x[pick], True)).float())
    assert bits_equal(ref[0], got[0]) and bits_equal(ref[1], got[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trust_mask_is_the_eager_mask(dtype):
    """QuEST's trust mask from quest.c equals |x / s| < fmax computed eagerly with the quantizer's own scales, NaN,
    inf and clipped values included (bugs caught: <= for <, the mask of the rounded values, a group's scale
    taken from its neighbour)."""
    from lowbit.kernels.quest import trust_mask
    from lowbit.quant import divide_by_scales

    q = T("e2m1", "tile", 8, "e8m0", scale_rule="quest")
    x = nasty((16, 64), dtype, seed=7)
    x[5, :8] = torch.tensor([0.0, 1.0, -1.0, 2.0, 40.0, -40.0, 0.5, 3.0])  # a group with clipped outliers
    _, s = fake_quantize_with_scales(x, q)
    s[6, 2] = 6.0  # a scale that puts some |x / s| exactly on the boundary ...
    x[6, 16:24] = torch.tensor([36.0, -36.0, 35.0, 1.0, 0.0, -0.0, 37.0, 6.0]).to(dtype)  # ... 36 / 6 = 6 = fmax
    got = trust_mask(x, s, 8, 6.0)
    want = divide_by_scales(x, q, s).abs() < 6.0
    assert got is not None and torch.equal(got, want)
    assert want.any() and not want.all() and not want[6, 16] and want[6, 18]


@settings(max_examples=40, deadline=None)
@given(B=st.sampled_from([16, 32, 64]), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 3),
       cols=st.integers(1, 3), data=st.data())
def test_quest_vector_path_property(B, dtype, rows, cols, data):
    """QuEST's scales on the vector path of quest.c (tiles of 16, 32, 64) for any values, NaN/inf/subnormals
    included, every dtype (the set above only holds tiles of 4 and 8, the scalar path)."""
    arr = data.draw(hnp.arrays(np.float32, (rows, cols * B), elements=st.floats(width=32, allow_nan=True,
                                                                               allow_infinity=True)))
    x = torch.from_numpy(arr).to(dtype)
    q = T("e2m1", "tile", B, "e8m0", scale_rule="quest")
    with pytest.MonkeyPatch.context() as mp:
        ref, got = both(mp, lambda: fake_quantize_with_scales(x, q))
    assert bits_equal(ref[0], got[0]) and bits_equal(ref[1], got[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", [T("e4m3", "tile", 128), T("e4m3", "tile", 64, "e8m0", scale_round="ceil"),
                               T("e2m1", "tile", 128, "e4m3", rounding="stochastic"), T("e4m3", "block", 128),
                               T("e5m2", "tile", 256, reciprocal=True),
                               T("e2m1", "tile", 16, "e4m3", four_over_six=True),
                               T("e2m1", "tile", 16, "e4m3", rounding="stochastic", four_over_six=True),
                               T("e2m1", "block", 16, "e4m3", four_over_six=True),
                               T("e2m1", "block", 16, "e4m3", rounding="stochastic", four_over_six=True)], ids=qid)
def test_wide_groups_bitwise(monkeypatch, q, dtype):
    """Groups of 64..256 elements (fp8-block's 1×128 tiles and 128×128 blocks): quant.c's whole-group loop with a
    runtime length, several groups per staging segment (bugs caught: the first group's scale used for all of a
    segment, the rng index restarted per group); and NVFP4 "4 over 6" on 1×16 tiles and 16×16 blocks, fos.c's
    group-by-group paths (bugs caught: the candidates' keys swapped, a tie picking "to 4", a block row's rng
    index taken as its tile's). Their pairwise error trees are common.h's tree16, whose order the QuEST
    summation-order test pins; random data does not discriminate the order of a block's 16 row sums."""
    x = nasty((128, 512), dtype, seed=11)
    for t in (x, torch.where(x.isfinite(), x, 0)):  # NaN/inf make their groups (NVFP4: the tensor) NaN
        ref, got = both(monkeypatch, lambda t=t: fake_quantize_with_scales(t, q, torch.Generator().manual_seed(2)))
        assert bits_equal(ref[0], got[0]) and bits_equal(ref[1], got[1])
    assert not ref[0].isnan().any()  # the second tensor really quantized (no NaN group)
