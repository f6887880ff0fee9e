"""Uniform random numbers for stochastic rounding.

    u = uniform(n, device, generator)     # fp32 [n] in [0, 1), multiples of 2^-24
    s = Stream(seed)                      # a layer call's keys: generator= for every draw of that call

On CPU each number is a hash of its index and one 31-bit key drawn from `generator` (so a seeded generator
reproduces the numbers, and every call advances it): the index times the golden-ratio constant, xor the key,
then MurmurHash3's 32-bit finalizer (fmix32), whose output bits each depend on every input bit; the top 24 bits
make the number. Why not torch.rand: on CPU it is a Mersenne Twister drawn element by element, which measured
about 3x this hash's thirteen vectorized integer passes and was the largest single cost of stochastic rounding.
On accelerators torch.rand (Philox, counter-based already) is used as is for a torch.Generator.
With a `Stream` (what the trainer's layers use) there is no torch.Generator at all: key i of the stream is
SplitMix64 of (seed + (i + 1)·φ), computed by int64 tensor ops from a 0-d seed tensor, and every device hashes
the index under that key. So stochastic rounding is bit for bit the same on CPU and GPU, and traceable by
torch.compile (no host-side state but the count of draws, a Python int fixed at trace time).
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


def hash_uniform(index: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """fp32 numbers in [0, 1) from int32 `index` and a key in [0, 2^31) (an int or a 0-d int32 tensor on index's
    device): the reference form of `uniform`."""
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


_PHI64 = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def i64(v: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores (its arithmetic wraps modulo 2^64)."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """z >>> k on int64 (logical: torch's >> is arithmetic, so the sign copies are masked off)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (every output bit depends on every input bit)."""
    z = (z ^ srl(z, 30)) * i64(_MIX1)
    z = (z ^ srl(z, 27)) * i64(_MIX2)
    return z ^ srl(z, 31)


BACKWARD_FIRST = 1 << 16  # a layer call's backward draws keys from this index on (its forward draws far fewer)


class Stream:
    """The random keys of one quantized-layer call, in the order its quantizers draw them: key i is the top 31
    bits of mix64(seed + (i + 1)·φ), from i = `first` on (a call's forward from 0, its backward from
    BACKWARD_FIRST, so neither depends on how many keys the other drew). seed: 0-d int64 tensor on the layer's
    device (lowbit.nn.state derives it from the layer index and a call counter buffer). Pass it where a
    torch.Generator is taken; make it where it is used (a traced autograd.Function may not mutate an object
    made outside it)."""

    def __init__(self, seed: torch.Tensor, first: int = 0):
        self.seed, self.drawn = seed, first
        self._seed_int: int | None = None  # the seed as a Python int, once read (CPU, eager)

    @property
    def device(self) -> torch.device:
        return self.seed.device

    def next_key(self) -> torch.Tensor:
        """0-d int64 in [0, 2^31); advances the stream."""
        self.drawn += 1
        return srl(mix64(self.seed + i64(self.drawn * _PHI64)), 33)

    def next_key_int(self) -> int:
        """next_key as a Python int, computed in Python (a dozen tensor ops cost ~50 µs on a CPU; the seed is read
        once per stream: a host sync on GPUs, so the CPU kernels' eager path only)."""
        if self._seed_int is None:
            self._seed_int = int(self.seed)
        self.drawn += 1
        return stream_key(self._seed_int, self.drawn - 1)


def stream_key(seed: int, i: int) -> int:
    """Key i of Stream(seed) in Python integers (the reference the tensor version is tested against)."""
    z = (seed + (i + 1) * _PHI64) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return (z ^ (z >> 31)) >> 33


def draw_key(generator: torch.Generator | Stream | None = None) -> int:
    """The 31-bit key of one `uniform` call on CPU (advances `generator`, or torch's default one)."""
    if isinstance(generator, Stream):
        return generator.next_key_int()
    return int(torch.randint(0, (1 << 31) - 1, (1,), generator=generator))


def uniform(n: int, device: torch.device, generator: torch.Generator | Stream | None = None) -> torch.Tensor:
    """fp32 [n] uniform in [0, 1) (see the module docstring); `generator` as torch.rand takes it, or a Stream."""
    if isinstance(generator, Stream):
        if device.type != "cpu" or torch.compiler.is_compiling():  # tensor ops: no host sync, traceable
            key = generator.next_key().to(device=device, dtype=torch.int32)
            return hash_uniform(torch.arange(n, dtype=torch.int32, device=device), key)
        key = generator.next_key_int()
    elif device.type != "cpu":
        return torch.rand(n, device=device, generator=generator)
    else:
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


def random_signs(n: int, device: torch.device, generator: torch.Generator | Stream | None = None) -> torch.Tensor:
    """fp32 [n] of ±1 with equal odds: from a Stream, the sign of u − 1/2 for one uniform draw (u < 1/2: +1);
    from a torch.Generator, torch.randint's bits (the numbers such callers always had). (fp32, not int64: inductor
    2.13's vectorised int64 select crashed on CPU.)"""
    if isinstance(generator, Stream):
        return torch.where(uniform(n, device, generator) < 0.5, 1.0, -1.0)
    return (torch.randint(0, 2, (n,), device=device, generator=generator) * 2 - 1).float()


def random_bits16(n: int, device: torch.device, generator: torch.Generator | Stream | None = None) -> torch.Tensor:
    """int32 [n] uniform in [0, 2^16): from a Stream the top 16 bits of one uniform draw's 24; from a
    torch.Generator, torch.randint's."""
    if isinstance(generator, Stream):
        return (uniform(n, device, generator) * 65536.0).to(torch.int32)
    return torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=device, generator=generator)
