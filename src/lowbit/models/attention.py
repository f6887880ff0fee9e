"""Causal attention entry point shared by the model families."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs), q/k/v [B, H, T, D] -> [B, H, T, D] in q's dtype.

    On CPU with bf16/fp16 inputs it runs on the fp32 upcast and rounds the output back once: the same
    inputs and output precision as a bf16 flash-attention kernel (which accumulates in fp32 too), and
    several times faster than torch's CPU bf16 kernels on CPUs without bf16 units (backward ~5x here).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
