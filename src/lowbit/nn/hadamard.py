"""Random block-Hadamard rotations (NVFP4's RHT on the weight-gradient GeMM)."""
from __future__ import annotations

import math

import torch


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), entries ±1, fp32 [n, n]."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def normalized_hadamard(n: int) -> torch.Tensor:
    """H/√n, fp32 [n, n] (orthogonal, symmetric): Quartet's forward rotation."""
    return hadamard_matrix(n) / math.sqrt(n)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """R = diag(s)·H/√n with random signs s (from `seed`): an orthogonal fp32 [n, n] matrix."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return s[:, None] * hadamard_matrix(n) / math.sqrt(n)


def rotate(a: torch.Tensor, R: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """a [rows, L] (any layout, any float dtype), zero-padded to L + pad columns (a multiple of n), times
    blockdiag(R, R, ...) along the last dim: fp32 [rows, L + pad]."""
    rows, L = a.shape
    n = R.shape[0]
    # the GeMM operand built in one pass (layout, dtype and padding at once; a transposed `a` would otherwise
    # be copied three times), then one [rows·(L+pad)/n, n] × [n, n] GeMM (a batched matmul would broadcast R)
    buf = (torch.zeros if pad else torch.empty)((rows, L + pad), dtype=torch.float32, device=a.device)
    buf[:, :L].copy_(a)
    return (buf.view(-1, n) @ R.float()).view(rows, L + pad)
