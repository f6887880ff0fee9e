"""lowbit.rng: the CPU counter-based uniform numbers against a pure-Python re-derivation of the hash, their
distribution, reproducibility from a seeded generator, and independence between calls."""
from __future__ import annotations

import math

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
