"""The compiled CPU reductions (quant.c): absmax per group and per tensor in one read-only pass, with the eager
form where the kernel does not apply. A max does not depend on its order, so both give the same values."""
from __future__ import annotations

import torch

from lowbit.kernels import DTYPE_CODES, absmax, cpu_library


def group_absmax(x3: torch.Tensor) -> torch.Tensor | None:
    """max |x| over the last dim of contiguous CPU x3 [R, G, B] as fp32 [R, G, 1] (NaN where a group holds one),
    in one read-only pass; None where the kernel does not apply (group_amax.group_absmax's eager code then)."""
    lib = cpu_library()
    if (lib is None or x3.device.type != "cpu" or x3.dtype not in DTYPE_CODES or not x3.is_contiguous()
            or x3.dim() != 3 or not x3.numel()):
        return None
    R, G, B = x3.shape
    out = torch.empty((R, G, 1), dtype=torch.float32)
    lib.lb_absmax_groups(x3.data_ptr(), R, G, B, DTYPE_CODES[x3.dtype], out.data_ptr(), torch.get_num_threads())
    return out


def tensor_amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-d fp32 tensor (NaN if t holds NaN; t non-empty): the kernel's one read-only pass for a
    contiguous CPU tensor, else t.abs().amax() (the same value: a max does not depend on its order)."""
    if t.device.type == "cpu" and t.dtype in DTYPE_CODES and t.is_contiguous() and cpu_library() is not None:
        return absmax(t)
    return t.abs().amax().float()
