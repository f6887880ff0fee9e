"""Group layout of the scaled quantizers: how a tensor splits into groups sharing one scale, and the shapes
of those scales (the rules are documented in lowbit.quant's module docstring). Shared by the eager
quantizers (lowbit.quant) and the compiled ones (lowbit.kernels)."""
from __future__ import annotations

import math

import torch

from lowbit.tensor_quant import TensorQuant


def as3d(x: torch.Tensor, q: TensorQuant) -> torch.Tensor:
    """x (contiguous) viewed as [R, G, B]: R rows of G groups of B elements along the
    last dim. "tensor": [N, 1, 1] (one scale); "row": [R, 1, C]; "tile"/"block": [R, C/b, b]."""
    if q.granularity == "tensor":
        return x.view(-1, 1, 1)
    C = x.shape[-1] if x.dim() else 1
    R = x.numel() // C if C else (math.prod(x.shape[:-1]) if x.dim() else 1)
    if q.granularity == "row":
        return x.view(R, 1, C)
    check_divisible(x.shape, R, C, q)
    return x.view(R, C // q.block, q.block)


def check_divisible(shape, R: int, C: int, q: TensorQuant) -> None:
    """ValueError naming the fix when the last dim C (or, for "block", the R rows) of a tensor of `shape` is
    not a multiple of q.block (tile/block granularity)."""
    b = q.block
    if C % b:
        raise ValueError(
            f"tensor of shape {tuple(shape)}: last dim {C} is not divisible by the {q.granularity} size "
            f"{b}; pad the last dim to a multiple of {b} or choose a block size that divides {C}")
    if q.granularity == "block" and R % b:
        raise ValueError(
            f"tensor of shape {tuple(shape)}: its {R} rows (leading dims flattened) are not divisible by the "
            f"block size {b} of granularity='block'; pad the rows to a multiple of {b}, choose a block size "
            f"that divides {R}, or use granularity='tile'")


def scale_shape(x_shape, q) -> tuple:
    C = x_shape[-1] if len(x_shape) else 1
    if q.granularity == "tensor":
        return ()
    if q.granularity == "row":
        return (*x_shape[:-1], 1) if len(x_shape) else (1,)
    if q.granularity == "tile":
        return (*x_shape[:-1], C // q.block, 1) if len(x_shape) else (C // q.block, 1)
    R = math.prod(x_shape[:-1]) if len(x_shape) else 1
    return (R // q.block, 1, C // q.block, 1)


def group_scales(s3, x_shape, q):
    """[R|1, G, 1] per-row scales -> the public scale shape."""
    if q.granularity == "block":
        b = q.block
        R, G, _ = s3.shape
        return s3[::b].reshape(R // b, 1, G, 1).clone()
    return s3.reshape(scale_shape(x_shape, q))


def rows_scales(scales, x3, q):
    """Public scale shape -> [R|1, G, 1] per-row scales for the elementwise kernel."""
    if q.granularity == "tensor":
        return scales.reshape(1, 1, 1)
    if q.granularity == "block":
        R, G, _ = x3.shape
        return scales.reshape(-1, 1, G, 1).expand(-1, q.block, G, 1).reshape(R, G, 1)
    return scales.reshape(x3.shape[0], x3.shape[1], 1)


def tree_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t summed over `dim` (kept, size 1) pairwise, (t0 + t1), (t2 + t3), ..., then pairs of those: an order the
    CPU kernel (kernels/fos.c) repeats, so the two pick the same candidate bit for bit; a size that is not a
    power of two (one group per tensor) takes torch's sum, whose order is its own."""
    n = t.shape[dim]
    if n & (n - 1):
        return t.sum(dim, keepdim=True)
    while t.shape[dim] > 1:
        pairs = t.unflatten(dim, (-1, 2))
        t = pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)
    return t
