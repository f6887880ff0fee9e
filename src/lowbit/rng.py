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
SR_SEED = 0x5EED_0001     # stochastic-rounding streams of layer i, call n: seeded from (SR_SEED + i, n)


def call_seed(layer_idx: int, call: int) -> int:
    """The seed of call `call`'s random stream in layer `layer_idx`: SplitMix64's finalizer of
    (SR_SEED + layer) · 2^32 + call (mod 2^64), so every bit depends on both (a plain sum would give every layer the
    same stream), in [0, 2^63). The Python-integer reference of call_seed_t."""
    z = (((SR_SEED + layer_idx) << 32) + call + _PHI64) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return (z ^ (z >> 31)) >> 1


def call_seed_t(layer_idx: int, call: torch.Tensor) -> torch.Tensor:
    """call_seed with the call index as a 0-d int64 tensor, by tensor ops on its device (eager only: inductor's
    integer range analysis miscompiled such chains in torch 2.13, so compiled code calls the ops below instead)."""
    return srl(mix64(call + i64(((SR_SEED + layer_idx) << 32) + _PHI64)), 1)


def stream_key(seed: int, i: int) -> int:
    """Key i of the stream seeded by `seed`, in Python integers: the top 31 bits of mix64(seed + (i + 1)·φ)."""
    z = (seed + (i + 1) * _PHI64) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return (z ^ (z >> 31)) >> 33


def _key_t(seed: torch.Tensor, i: int) -> torch.Tensor:
    """stream_key by int64 tensor ops (eager)."""
    return srl(mix64(seed + i64((i + 1) * _PHI64)), 33)


class Stream:
    """Random keys drawn in order, key i = stream_key(seed, i) from i = `first` on. The seed is an int or a 0-d
    int64 tensor, or, for a layer call, derived: call_seed(layer, call) with `call` a 0-d int64 tensor (the
    layer's counter when the call began), then, for each index j in `path`, stream_key(seed, j) (child streams).
    A call's forward draws from index 0, its backward from BACKWARD_FIRST. Pass it where a torch.Generator is
    taken. Eager CPU code derives keys in Python integers; eager GPU code by tensor ops (no host sync); compiled
    code passes (call, layer, path) to opaque ops that derive them (no integer arithmetic in generated code)."""

    def __init__(self, seed: int | torch.Tensor | None = None, first: int = 0, *, layer: int = 0,
                 call: torch.Tensor | None = None, path: tuple[int, ...] = ()):
        self.drawn, self.layer, self.call, self.path = first, layer, call, tuple(path)
        self._seed, self._seed_int = (None, seed) if isinstance(seed, int) else (seed, None)

    @property
    def device(self) -> torch.device:
        t = self.call if self.call is not None else self._seed
        return torch.device("cpu") if t is None else t.device

    def seed_int(self) -> int:
        """The seed in Python integers (reads the call counter: a host sync on GPUs)."""
        if self._seed_int is None:
            if self.call is None:
                self._seed_int = int(self._seed)
            else:
                s = call_seed(self.layer, int(self.call))
                for j in self.path:
                    s = stream_key(s, j)
                self._seed_int = s
        return self._seed_int

    def seed_tensor(self) -> torch.Tensor:
        """The seed as a 0-d int64 tensor on the stream's device, by tensor ops (eager)."""
        if self._seed is None:
            if self.call is None:
                self._seed = torch.tensor(self._seed_int, dtype=torch.int64)
            else:
                s = call_seed_t(self.layer, self.call)
                for j in self.path:
                    s = _key_t(s, j)
                self._seed = s
        return self._seed

    def child(self) -> Stream:
        """The stream of one quantizer call, seeded by this stream's next key: the parent advances by one key per
        call however many the call draws (one per chunk of rows), so a compiled call can run as one opaque op."""
        i = self.drawn
        self.drawn += 1
        if self.call is not None:  # derived lazily, where it is used
            return Stream(layer=self.layer, call=self.call, path=self.path + (i,))
        if self.device.type == "cpu" and not torch.compiler.is_compiling():
            return Stream(stream_key(self.seed_int(), i))
        return Stream(_key_t(self.seed_tensor(), i))

    def next_key(self) -> torch.Tensor:
        """0-d int64 in [0, 2^31) by tensor ops; advances the stream."""
        self.drawn += 1
        return _key_t(self.seed_tensor(), self.drawn - 1)

    def next_key_int(self) -> int:
        """next_key in Python integers (a dozen tensor ops cost ~50 µs on a CPU)."""
        self.drawn += 1
        return stream_key(self.seed_int(), self.drawn - 1)


def draw_key(generator: torch.Generator | Stream | None = None) -> int:
    """The 31-bit key of one `uniform` call on CPU (advances `generator`, or torch's default one)."""
    if isinstance(generator, Stream):
        return generator.next_key_int()
    return int(torch.randint(0, (1 << 31) - 1, (1,), generator=generator))


def uniform(n: int, device: torch.device, generator: torch.Generator | Stream | None = None) -> torch.Tensor:
    """fp32 [n] uniform in [0, 1) (see the module docstring); `generator` as torch.rand takes it, or a Stream."""
    if isinstance(generator, Stream):
        if generator.call is not None and torch.compiler.is_compiling():  # one opaque op: the key derived inside
            generator.drawn += 1
            path = [*generator.path, generator.drawn - 1]
            return torch.ops.lowbit.stream_uniform(generator.call, generator.layer, path, n).to(device)
        if device.type != "cpu" or torch.compiler.is_compiling():  # tensor ops: no host sync
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


@torch.library.custom_op("lowbit::stream_uniform", mutates_args=())
def _stream_uniform(call: torch.Tensor, layer: int, path: list[int], n: int) -> torch.Tensor:
    """uniform(n) under key path[-1] of a layer call's stream (path[:-1] its ancestry), on call's device: what
    compiled code calls, so the key is derived in Python or eager tensor ops, not in generated code."""
    s = Stream(layer=layer, call=call, path=tuple(path))
    key = s.seed_int() if call.device.type == "cpu" else s.seed_tensor().to(torch.int32)
    return hash_uniform(torch.arange(n, dtype=torch.int32, device=call.device), key)


@_stream_uniform.register_fake
def _(call, layer, path, n):
    return call.new_empty((n,), dtype=torch.float32)
