"""Batches of random training windows and deterministic evaluation windows.

Training: every step draws ``batch_size * world_size`` window starts from one seeded numpy PCG64
generator shared (by seed) by all ranks; rank r keeps rows ``[r*B, (r+1)*B)``. So a 2-rank run sees
exactly the global batches of a 1-rank run with ``batch_size*2``, and the generator state (exported by
``state_dict``) is all a resumed run needs to continue with the very same batches.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_len(n: int, seq_len: int, what: str) -> None:
    if n < seq_len + 1:
        raise ValueError(f"{what} has {n} tokens, need at least seq_len+1={seq_len + 1}; "
                         f"use a smaller --seq-len or more data")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[i:i+T], y = tokens[i+1:i+T+1] for each start i -> two int64 [len(starts), T]."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    buf = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    device = torch.device(device)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    else:
        buf = buf.to(device)
    return buf[:, :-1], buf[:, 1:]


class Batcher:
    """Random windows of ``seq_len + 1`` tokens from a 1-D token array.

    ``next() -> (x, y)``: int64 tensors [batch_size, seq_len] on ``device``; ``batch_size`` is per rank.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if np.ndim(tokens) != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {np.shape(tokens)}")
        _check_len(len(tokens), seq_len, "corpus")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.step = 0  # batches drawn so far

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * self.world_size)
        self.step += 1
        mine = starts[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.seq_len, self.device)

    def state_dict(self) -> dict:
        """Plain python ints/strings (JSON- and torch.save-friendly)."""
        return {"rng": self._rng.bit_generator.state, "step": self.step, "seed": self.seed,
                "global_batch": self.batch_size * self.world_size, "seq_len": self.seq_len,
                "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off. The global batch, seq_len and data size must match the
        saved run (world_size may change if the global batch stays the same)."""
        mine = self.state_dict()
        for k in ("global_batch", "seq_len", "n_tokens"):
            if state[k] != mine[k]:
                raise ValueError(f"cannot resume batches: saved {k}={state[k]} but this run has {mine[k]}; "
                                 f"resume with the same data, batch_size*world_size and seq_len")
        self._rng.bit_generator.state = state["rng"]
        self.step = state["step"]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
    """``n`` deterministic batches (x, y) for evaluation: ``n * batch_size * world_size`` windows with
    starts spread evenly over ``tokens`` (no randomness, so every evaluation sees the same text;
    windows do not overlap while the set is large enough). Rank r takes its rows of each global batch.
    Yields int64 tensors [batch_size, seq_len]."""
    if n < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"n, batch_size and seq_len must be >= 1, got {n}, {batch_size}, {seq_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    _check_len(len(tokens), seq_len, "validation set")
    g = batch_size * world_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * g).round().astype(np.int64)

    def gen():  # checks above run at call time, batches are built lazily
        for b in range(n):
            mine = starts[b * g + rank * batch_size: b * g + (rank + 1) * batch_size]
            yield _windows(tokens, mine, seq_len, device)

    return gen()
