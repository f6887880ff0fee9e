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


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """R = diag(s)·H/√n with random signs s (from `seed`): an orthogonal fp32 [n, n] matrix."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return s[:, None] * hadamard_matrix(n) / math.sqrt(n)


def rotate(a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """a [rows, L] (L a multiple of n) times blockdiag(R, R, ...) [L, L] along the last dim, in fp32."""
    rows, L = a.shape
    n = R.shape[0]
    # one [rows·L/n, n] × [n, n] GeMM (a batched matmul would broadcast R into rows·L/n copies)
    return (a.float().reshape(-1, n) @ R.float()).view(rows, L)
