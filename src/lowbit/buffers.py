"""Reused CPU work buffers for the quantizers (lowbit.quant, lowbit.rng)."""
from __future__ import annotations

import threading

import torch

_SCRATCH = threading.local()


def scratch(n: int, device: torch.device, slot: int = 0) -> torch.Tensor:
    """An fp32 work buffer of n elements, reused across calls on CPU (per thread, per slot; contents
    undefined). Why: a fresh multi-MiB CPU buffer is mapped page by page on first write, which cost
    the quantizer 5-8x a copy of its input (measured on a [512, 1536] bf16 operand). Accelerators
    have caching allocators: there this is a plain torch.empty. The caller must not keep the buffer
    past its own call (the next call on this thread reuses it)."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # a traced graph must not capture shared buffers
        return torch.empty(n, dtype=torch.float32, device=device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    b = bufs.get(slot)
    if b is None or b.numel() < n:
        b = bufs[slot] = torch.empty(max(n, 1 << 16), dtype=torch.float32)
    return b[:n]
