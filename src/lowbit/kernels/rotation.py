"""The compiled CPU kernel of the blockwise Hadamard rotation (rotate.c): bit for bit lowbit.nn.hadamard's eager
butterflies, in one pass that reads the operand once and writes it once in its output dtype."""
from __future__ import annotations

import torch

from lowbit.kernels import DTYPE_CODES, cpu_library


def rotate_physical(src: torch.Tensor, dim0: bool, n: int, signs: torch.Tensor | None, scale: float, pad: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
    """src [A, B] CPU (rows of stride src.stride(0), unit column stride), rotated in runs of n along dim 0 (dim0)
    or dim 1, zero-padded by `pad` along that dim first: a fresh contiguous tensor in dtype ([A + pad, B] or
    [A, B + pad]); None where the kernel does not apply (no library, a dtype or n it does not take)."""
    lib = cpu_library()
    if (torch.compiler.is_compiling() or lib is None or src.device.type != "cpu" or src.dim() != 2 or n > 64
            or (src.stride(1) != 1 and src.shape[1] > 1 and src.numel())
            or src.dtype not in DTYPE_CODES or dtype not in DTYPE_CODES):
        return None
    A, B = src.shape
    L, W = (A, B) if dim0 else (B, A)
    out = torch.empty((A + pad, B) if dim0 else (A, B + pad), dtype=dtype)
    s = None if signs is None else signs.detach().to(torch.float32).contiguous()
    failed = lib.lb_rotate(src.data_ptr(), DTYPE_CODES[src.dtype], L, W, max(src.stride(0), 1), int(dim0), n,
                           None if s is None else s.data_ptr(), scale, L + pad, out.data_ptr(),
                           DTYPE_CODES[dtype], torch.get_num_threads())
    return None if failed else out
