"""The compiled CPU kernel of QuEST's trust mask (quest.c): Quartet's forward keeps the gradient only where the
quantizer did not clip, |x / s| < fmax, the same booleans as the eager `divide_by_scales(x, q, s).abs() < fmax`
without the fp32 quotient tensor."""
from __future__ import annotations

import torch

from lowbit.kernels import DTYPE_CODES, cpu_library


def trust_mask(x: torch.Tensor, scales: torch.Tensor, block: int, fmax: float) -> torch.Tensor | None:
    """x [R, L] (CPU, contiguous, fp32/bf16/fp16), scales fp32 with R·L/block entries (one per 1×block tile, row
    major): bool [R, L], or None where the kernel does not apply (eager then)."""
    lib = cpu_library()
    if (torch.compiler.is_compiling() or lib is None or x.device.type != "cpu" or x.dim() != 2
            or not x.is_contiguous() or x.dtype not in DTYPE_CODES or x.shape[1] % block):
        return None
    R, L = x.shape
    s = scales.detach().to(torch.float32).contiguous()
    if s.numel() != R * (L // block):
        return None
    m = torch.empty((R, L), dtype=torch.bool)
    lib.lb_trust_mask(x.data_ptr(), DTYPE_CODES[x.dtype], R, L // block, block, s.data_ptr(), fmax, m.data_ptr(),
                      torch.get_num_threads())
    return m
