"""The blockwise Hadamard rotation (lowbit.nn.hadamard): the eager butterflies against the matrix definition
R = diag(s)·H_n/√n in float64, the C kernel bit for bit against the butterflies, the GPU's GeMM route up to
summation order, layouts, and torch.compile."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import sylvester
from lowbit.kernels import cpu
from lowbit.kernels.rotation import rotate_physical
from lowbit.nn.hadamard import hadamard_signs, normalized_hadamard, rotate, rotate_reference
from test_kernels import bits_equal  # NaN where NaN (torch's own bf16 casts write two NaN patterns), else equal bits

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
needs_kernels = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the CPU kernels cannot build")


def exact(a: torch.Tensor, n: int, signs, pad: int) -> torch.Tensor:
    """a [rows, L] zero-padded by pad, times blockdiag(diag(s)·H_n/√n) along the last dim, in float64."""
    s = torch.ones(n, dtype=torch.float64) if signs is None else signs.double()
    R = s[:, None] * sylvester(n) / math.sqrt(n)
    return (F.pad(a.double(), (0, pad)).reshape(-1, n) @ R).view(a.shape[0], a.shape[1] + pad)


@pytest.mark.parametrize("n", [2, 16, 32])
@pytest.mark.parametrize("dim0", [False, True])
def test_reference_is_the_matrix_rotation(n, dim0):
    """The butterflies equal diag(s)·H/√n to fp32 rounding: log2(n) additions and one scaling per output, each a
    relative 2^-24 of at most Σ|a|/√n (bugs caught: pairing (j, j + 1) at every stage, u − v and u + v swapped,
    the signs applied to the outputs instead of the inputs, 1/n for 1/√n)."""
    torch.manual_seed(n)
    a = torch.randn(24, 4 * n)
    s = hadamard_signs(n, 5)
    src = a.t().contiguous() if dim0 else a
    got = rotate_reference(src, dim0, n, s, 0)
    got = got.t() if dim0 else got
    bound = (math.log2(n) + 1) * 2.0 ** -24 * a.abs().reshape(-1, n).sum(1, keepdim=True) / math.sqrt(n)
    err = (got.double() - exact(a, n, s, 0)).abs().reshape(-1, n)
    assert (err <= bound.double()).all()
    assert err.max() > 0  # it really rounded in fp32 (not a float64 product in disguise)


def test_padding_rotates_zeros():
    """Columns L..L+pad are zeros before the rotation, so the padded run's outputs are those of a zero-filled run
    (bug caught: torch.empty for the padded buffer, or ones)."""
    a = torch.randn(3, 20) + 5
    got = rotate_reference(a, False, 16, None, 12)
    torch.testing.assert_close(got.double(), exact(a, 16, None, 12), rtol=0, atol=1e-5)


_shapes = st.tuples(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), st.integers(0, 70), st.integers(0, 4),
                    st.integers(0, 3), st.booleans())


def _values(rng: np.random.Generator, shape, special: bool) -> torch.Tensor:
    v = rng.standard_normal(shape).astype(np.float32) * np.float32(2.0) ** rng.integers(-20, 20, shape)
    if special and v.size:
        pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e38, 3e38, 65504.0, 2.0 ** -149],
                        dtype=np.float32)
        idx = rng.integers(0, v.size, max(1, v.size // 7))
        v.reshape(-1)[idx] = pool[rng.integers(0, pool.size, idx.size)]
    return torch.from_numpy(v)


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(shape=_shapes, din=st.sampled_from(DTYPES), dout=st.sampled_from(DTYPES), signed=st.booleans(),
       special=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_kernel_is_the_reference_bit_for_bit(shape, din, dout, signed, special, seed):
    """rotate.c == rotate_reference(...).to(dtype) bit for bit, both axes, every dtype pair, n = 1..64, odd widths
    (not a multiple of the kernel's 64-lane tile), empty, padded, NaN/inf/zeros/subnormals/overflow (bugs caught:
    a stage order h = n/2, .., 1; the scale applied before the butterflies; the pad rows loaded from memory;
    a tail tile's lanes written past the width; bf16 stored by truncation)."""
    n, groups, extra, other, dim0 = shape
    L = max(groups * n - extra, 0)
    pad = groups * n - L
    W = other * 23 + (n % 5)
    rng = np.random.default_rng(seed)
    src = _values(rng, (L, W) if dim0 else (W, L), special).to(din)
    s = hadamard_signs(n, seed) if signed else None
    got = rotate_physical(src, dim0, n, s, 1 / math.sqrt(n), pad, dout)
    want = rotate_reference(src, dim0, n, s, pad).to(dout)
    assert got is not None and bits_equal(got, want)


@needs_kernels
def test_kernel_reads_strided_rows():
    """A source whose rows are a slice of a wider tensor (row stride > width) is read at its stride (bug caught:
    ld taken as the width)."""
    base = torch.randn(32, 50)
    src = base[:, :40]
    got = rotate_physical(src, True, 16, hadamard_signs(16, 1), 0.25, 0, torch.float32)
    assert torch.equal(got, rotate_reference(src, True, 16, hadamard_signs(16, 1), 0))


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_rotate_keeps_a_transposed_view_transposed(mode, monkeypatch):
    """rotate() of a transposed view rotates it in its own memory order and returns a transposed view with the
    reference's values; LOWBIT_KERNELS=eager gives the same bits (bug caught: the T-path rotating along the
    wrong dim of the source)."""
    monkeypatch.setenv("LOWBIT_KERNELS", mode)
    H, s = normalized_hadamard(16), hadamard_signs(16, 2)
    a = torch.randn(40, 24).bfloat16().t()  # [24, 40], a view of a contiguous [40, 24]
    out = rotate(a, H, s, pad=8, dtype=torch.bfloat16)
    assert out.shape == (24, 48) and out.t().is_contiguous()
    torch.testing.assert_close(out.double(), exact(a, 16, s, 8), rtol=2 ** -8, atol=1e-6)  # bf16 output
    assert torch.equal(out, rotate(a.contiguous(), H, s, pad=8, dtype=torch.bfloat16))


def test_gemm_route_matches_up_to_summation_order():
    """The GPU route (one GeMM against diag(s)·H/√n, here run on CPU) equals the butterflies within the fp32
    error of an n-term sum of Σ|a|/√n (stated in hadamard's docstring)."""
    from lowbit.nn.hadamard import rotate_gemm  # the GPU route, run on CPU here
    H, s = normalized_hadamard(32), hadamard_signs(32, 9)
    a = torch.randn(16, 96)
    g = rotate_gemm(a, H, s, 0)
    r = rotate_reference(a, False, 32, s, 0)
    bound = (32 + 5 + 2) * 2.0 ** -24 * a.abs().reshape(-1, 32).sum(1, keepdim=True) / math.sqrt(32)
    assert ((g - r).abs().reshape(-1, 32) <= bound).all()


def test_compiled_rotate_is_eager_bit_for_bit():
    """Under torch.compile the opaque lowbit::rotate op runs the same kernel (bug caught: a fake returning the
    unpadded shape, or the op dropping the signs)."""
    H, s = normalized_hadamard(16), hadamard_signs(16, 4)
    f = lambda a: rotate(a.t(), H, s, 8, torch.bfloat16) * 2
    a = torch.randn(40, 24).bfloat16()
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(a)
    assert torch.equal(got, f(a))
