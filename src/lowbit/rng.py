"""Uniform random numbers for stochastic rounding.

    u = uniform(n, device, generator)     # fp32 [n] in [0, 1), multiples of 2^-24

On CPU each number is a hash of its index and one 31-bit key drawn from `generator` (so a seeded generator
reproduces the numbers, and every call advances it): the index times the golden-ratio constant, xor the key,
then MurmurHash3's 32-bit finalizer (fmix32), whose output bits each depend on every input bit; the top 24 bits
make the number. Why not torch.rand: on CPU it is a Mersenne Twister drawn element by element, which measured
about 3x this hash's thirteen vectorized integer passes and was the largest single cost of stochastic rounding.
On accelerators torch.rand (Philox, counter-based already) is used as is.
The returned CPU tensor is a reused buffer, valid until the next call on the same thread.
"""
from __future__ import annotations

import torch

from lowbit.buffers import scratch

# 32-bit constants as signed int32 (torch's int32 arithmetic wraps modulo 2^32)
_GOLDEN = 0x9E3779B9 - (1 << 32)
_FMIX1 = 0x85EBCA6B - (1 << 32)
_FMIX2 = 0xC2B2AE35 - (1 << 32)
_COUNTERS: dict[str, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(str(device))
    if c is None or c.numel() < n:
        c = _COUNTERS[str(device)] = torch.arange(max(n, 1 << 16), dtype=torch.int32, device=device)
    return c[:n]


def _xorshift_(h: torch.Tensor, shift: int, t: torch.Tensor) -> None:
    """h ^= h >>> shift (logical shift: torch's >> on int32 is arithmetic, so the sign copies are masked off)."""
    torch.bitwise_right_shift(h, shift, out=t)
    t.bitwise_and_((1 << (32 - shift)) - 1)
    h.bitwise_xor_(t)


def hash_uniform(index: torch.Tensor, key: int) -> torch.Tensor:
    """fp32 numbers in [0, 1) from int32 `index` and a key in [0, 2^31): the reference form of `uniform`."""
    h, t = torch.empty_like(index), torch.empty_like(index)
    _hash_into(index, key, h, t)
    return _to_unit(h, t, torch.empty(index.shape, dtype=torch.float32, device=index.device))


def _hash_into(index: torch.Tensor, key: int, h: torch.Tensor, t: torch.Tensor) -> None:
    torch.mul(index, _GOLDEN, out=h)
    h.bitwise_xor_(key)
    _xorshift_(h, 16, t)
    h.mul_(_FMIX1)
    _xorshift_(h, 13, t)
    h.mul_(_FMIX2)
    _xorshift_(h, 16, t)


def draw_key(generator: torch.Generator | None = None) -> int:
    """The 31-bit key of one `uniform` call on CPU (advances `generator`, or torch's default one)."""
    return int(torch.randint(0, (1 << 31) - 1, (1,), generator=generator))


def uniform(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 [n] uniform in [0, 1) (see the module docstring); `generator` as torch.rand takes it."""
    if device.type != "cpu":
        return torch.rand(n, device=device, generator=generator)
    key = draw_key(generator)
    h = scratch(n, device, 3).view(torch.int32)
    t = scratch(n, device, 4).view(torch.int32)
    _hash_into(_counters(n, device), key, h, t)
    return _to_unit(h, t, scratch(n, device, 3))  # h is no longer needed: its buffer takes the result


def _to_unit(h: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = (top 24 bits of h, the best mixed) * 2^-24; t: int32 scratch."""
    torch.bitwise_right_shift(h, 8, out=t)
    t.bitwise_and_(0xFFFFFF)
    return torch.mul(t, 2.0 ** -24, out=out)
