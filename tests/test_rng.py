"""lowbit.rng: the CPU counter-based uniform numbers against a pure-Python re-derivation of the hash, their
distribution, reproducibility from a seeded generator, and independence between calls."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit import rng


def _fmix_reference(i: int, key: int) -> float:
    """The hash written with Python integers, independently of torch's int32 arithmetic."""
    m = 0xFFFFFFFF
    h = ((i * 0x9E3779B9) & m) ^ key
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    h ^= h >> 16
    return (h >> 8) / 2 ** 24


def test_hash_matches_the_python_reference():
    # catches a sign-extended (arithmetic) shift, a missing mask, or a wrong constant in the int32 version
    idx = torch.tensor([0, 1, 2, 3, 1000, 2 ** 20 + 7, 2 ** 31 - 1], dtype=torch.int32)
    for key in (0, 1, 12345, 2 ** 31 - 2):
        got = rng.hash_uniform(idx, key).tolist()
        assert got == [_fmix_reference(int(i), key) for i in idx]


def test_uniform_is_the_hash_of_the_index_under_the_drawn_key():
    g = torch.Generator().manual_seed(3)
    key = int(torch.randint(0, (1 << 31) - 1, (1,), generator=torch.Generator().manual_seed(3)))
    u = rng.uniform(1000, torch.device("cpu"), g).clone()
    assert torch.equal(u, rng.hash_uniform(torch.arange(1000, dtype=torch.int32), key))


def test_distribution_and_independence():
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    u = rng.uniform(n, torch.device("cpu"), g).clone()
    v = rng.uniform(n, torch.device("cpu"), g).clone()
    assert 0 <= u.min() and u.max() < 1 and torch.all(u * 2 ** 24 == (u * 2 ** 24).round())
    # mean 1/2 and variance 1/12 within 6 standard errors; 64-bin chi-square far below its 1e-6 tail (~130)
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, 64, 0, 1)
    assert ((counts - n / 64) ** 2 / (n / 64)).sum().item() < 130
    for a, b in ((u, v), (u[:-1], u[1:])):  # consecutive calls, neighbouring elements: uncorrelated
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(n)


def test_seeded_generators_reproduce():
    a = rng.uniform(4096, torch.device("cpu"), torch.Generator().manual_seed(7)).clone()
    b = rng.uniform(4096, torch.device("cpu"), torch.Generator().manual_seed(7)).clone()
    c = rng.uniform(4096, torch.device("cpu"), torch.Generator().manual_seed(8)).clone()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stream_keys_match_the_python_reference():
    # Stream's int64 tensor arithmetic (wrapping multiplies, logical shifts) against SplitMix64 in Python integers.
    # Bugs caught: an arithmetic (sign-copying) shift, the increment applied before instead of after the first
    # draw, a multiplier constant past 2^63 not wrapped to int64.
    for seed in (0, 1, 2 ** 62 + 12345, 2 ** 63 - 1, 0x5EED_0001 << 32):
        s = rng.Stream(torch.tensor(seed, dtype=torch.int64))
        got = [int(s.next_key()) for _ in range(5)]
        assert got == [rng.stream_key(seed, i) for i in range(5)] and all(0 <= k < 2 ** 31 for k in got)
        s = rng.Stream(torch.tensor(seed, dtype=torch.int64))  # the Python-int path (CPU kernels), interleaved
        got = [int(s.next_key()) if i % 2 else rng.draw_key(s) for i in range(5)]
        assert got == [rng.stream_key(seed, i) for i in range(5)]


def test_layer_call_seeds_as_tensors_match_the_python_reference():
    # The layer's call counter is a tensor buffer; its seed must be call_seed's (the checkpointed counter keeps
    # meaning the same stream). Bug caught: the layer offset dropped, or the sum not wrapped modulo 2^64.
    from lowbit.nn.state import call_seed, call_seed_t
    for layer in (0, 1, 7, 300):
        for call in (0, 1, 2 ** 32 - 1, 2 ** 32 + 5, 123456789):
            assert int(call_seed_t(layer, torch.tensor(call))) == call_seed(layer, call)


def test_stream_uniform_is_the_hash_under_the_stream_key_on_every_path():
    # With a Stream, uniform is hash(index, key i) whether it runs on CPU buffers (eager) or on fresh tensors
    # (other devices and torch.compile take that path): the same numbers everywhere, so SR does not depend on the
    # device. Bug caught: the fresh-tensor path hashing without the key, or keys drawn in another order.
    seed = 987654321
    s = rng.Stream(torch.tensor(seed))
    a = rng.uniform(1000, torch.device("cpu"), s).clone()
    b = rng.uniform(1000, torch.device("cpu"), s).clone()
    idx = torch.arange(1000, dtype=torch.int32)
    assert torch.equal(a, rng.hash_uniform(idx, rng.stream_key(seed, 0)))
    assert torch.equal(b, rng.hash_uniform(idx, rng.stream_key(seed, 1)))
    key = rng.Stream(torch.tensor(seed)).next_key().to(torch.int32)
    assert torch.equal(rng.hash_uniform(idx, key), a)  # the tensor-key form


def test_stream_signs_and_bits_follow_one_uniform_draw():
    # Quartet's random signs and bf16 SR's random low bits come from one uniform draw of the stream each.
    # Bug caught: the sign threshold inverted (u < 1/2 must give +1), or 16 bits taken from the low end.
    seed = 42
    u = rng.hash_uniform(torch.arange(64, dtype=torch.int32), rng.stream_key(seed, 0))
    signs = rng.random_signs(64, torch.device("cpu"), rng.Stream(torch.tensor(seed)))
    assert torch.equal(signs, torch.where(u < 0.5, 1.0, -1.0))
    bits = rng.random_bits16(64, torch.device("cpu"), rng.Stream(torch.tensor(seed)))
    assert torch.equal(bits, (u * 65536).floor().to(torch.int32)) and int(bits.max()) < 2 ** 16


def test_layer_streams_derive_their_seeds_alike_on_every_path():
    # A layer call's stream is derived, not stored: call_seed(layer, call), then one stream_key per child level.
    # The Python-integer path (CPU eager), the tensor path (GPU eager) and the opaque op compiled code calls
    # (lowbit::stream_uniform) give the same seed and numbers. Bugs caught: a child keyed by the parent's seed
    # instead of its key, the op using the path's last index as a child rather than as the key index.
    layer, call = 5, torch.tensor(17)
    s = rng.Stream(layer=layer, call=call, path=(3, 0))
    want = rng.stream_key(rng.stream_key(rng.call_seed(layer, 17), 3), 0)
    assert s.seed_int() == want and int(rng.Stream(layer=layer, call=call, path=(3, 0)).seed_tensor()) == want
    parent = rng.Stream(layer=layer, call=call)
    parent.drawn = 3
    child = parent.child()
    assert child.path == (3,) and parent.drawn == 4 and child.seed_int() == rng.stream_key(rng.call_seed(layer, 17), 3)
    eager = rng.uniform(100, torch.device("cpu"), rng.Stream(layer=layer, call=call, path=(3,))).clone()
    op = torch.ops.lowbit.stream_uniform(call, layer, [3, 0], 100)
    assert torch.equal(eager, op)
    assert torch.equal(op, rng.hash_uniform(torch.arange(100, dtype=torch.int32), want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
def test_cuda_stream_draws_the_cpu_numbers():
    # A layer call's stream on a GPU (tensor ops, no host sync) gives the numbers the CPU gives (Python integers):
    # stochastic rounding no longer depends on the device. Bug caught: torch.rand's Philox on CUDA again.
    for dev in ("cpu", "cuda"):
        s = rng.Stream(layer=2, call=torch.tensor(9, device=dev), path=(1,))
        got = [rng.uniform(4096, torch.device(dev), s).cpu().clone() for _ in range(2)]
        if dev == "cpu":
            want = got
    assert all(torch.equal(a, b) for a, b in zip(want, got))
