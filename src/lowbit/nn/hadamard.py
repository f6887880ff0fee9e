"""Blockwise randomized Hadamard rotations: NVFP4's RHT on the weight-gradient GeMM, Quartet's rotations.

The specification (`rotate_reference`, eager PyTorch): each run of n along the rotated dim is multiplied by
R = diag(s)·H_n/√n (H_n Sylvester's, s ±1 signs) as a fast Walsh-Hadamard transform with a fixed order:

    x ⊙ s (exact)  ->  stages h = 1, 2, .., n/2: (x_j, x_{j+h}) -> (x_j + x_{j+h}, x_j − x_{j+h}) in fp32, for each
    j whose bit h is clear  ->  × fp32(1/√n)  ->  the output dtype (one rounding)

log2(n) roundings per output instead of a GeMM's n, in an order a compiled kernel can repeat: on CPUs the C
kernel (lowbit.kernels.rotation) is bit for bit this code. On GPUs the rotation stays one GeMM against R
(tensor cores; equal to the butterflies up to fp32 summation order, bounded in tests/test_hadamard.py).
"""
from __future__ import annotations

import logging
import math

import torch

from lowbit.kernels.rotation import rotate_physical


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


def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """n random signs ±1 (fp32 [n]) from `seed`: the s of R = diag(s)·H/√n."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """R = diag(s)·H/√n with s = hadamard_signs(n, seed): an orthogonal fp32 [n, n] matrix."""
    return hadamard_signs(n, seed)[:, None] * normalized_hadamard(n)


def butterflies(x3: torch.Tensor) -> torch.Tensor:
    """The unnormalized n-point Walsh-Hadamard transform along dim 1 of fp32 x3 [G, n, W], stages h = 1, 2, ..."""
    G, n, W = x3.shape
    h = 1
    while h < n:
        v = x3.reshape(G, n // (2 * h), 2, h, W)
        u, w = v[:, :, 0], v[:, :, 1]
        x3 = torch.stack((u + w, u - w), dim=2).reshape(G, n, W)
        h *= 2
    return x3


def rotate_reference(src: torch.Tensor, dim0: bool, n: int, signs: torch.Tensor | None, pad: int) -> torch.Tensor:
    """src [A, B] (any float dtype) rotated in runs of n along dim 0 (dim0) or dim 1, zero-padded by `pad` along
    it first: fp32, contiguous, [A + pad, B] or [A, B + pad]. The specification of the rotation."""
    A, B = src.shape
    buf = torch.zeros((A + pad, B) if dim0 else (A, B + pad), dtype=torch.float32, device=src.device)
    buf[:A, :B].copy_(src)
    x3 = buf.view(-1, n, B) if dim0 else buf.view(-1, n, 1)
    if signs is not None:
        x3 = x3 * signs.to(device=src.device, dtype=torch.float32).view(1, n, 1)
    x3 = butterflies(x3) * torch.tensor(1 / math.sqrt(n), dtype=torch.float32, device=src.device)
    return x3.reshape(buf.shape)


def _rotate_eager(src, dim0: bool, n: int, signs, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """The C kernel where it applies, else the reference (rotate_reference's arguments, output in dtype)."""
    out = rotate_physical(src, dim0, n, signs, 1 / math.sqrt(n), pad, dtype)
    return rotate_reference(src, dim0, n, signs, pad).to(dtype) if out is None else out


def _rotate_op():
    """torch.ops.lowbit.rotate (opaque under torch.compile: the C kernel or the reference), or None (one warning)
    where this torch's custom_op cannot take the signature: compiled code then traces the reference."""
    def impl(src: torch.Tensor, dim0: bool, n: int, signs: torch.Tensor | None, pad: int,
             dtype: torch.dtype) -> torch.Tensor:
        return _rotate_eager(src, dim0, n, signs, pad, dtype)

    def fake(src, dim0, n, signs, pad, dtype):
        A, B = src.shape
        return src.new_empty((A + pad, B) if dim0 else (A, B + pad), dtype=dtype)

    try:
        op = torch.library.custom_op("lowbit::rotate", mutates_args=())(impl)
        op.register_fake(fake)
        return op
    except Exception as e:  # noqa: BLE001 -- a torch whose custom_op cannot take this signature: trace instead
        logging.getLogger("lowbit").warning("torch.compile will trace the eager rotation (%s)", e)
        return None


_ROTATE_OP = _rotate_op()


def _rotate_physical(src, dim0: bool, n: int, signs, pad: int, dtype: torch.dtype) -> torch.Tensor:
    if _ROTATE_OP is not None and torch.compiler.is_compiling():
        return _ROTATE_OP(src, dim0, n, signs, pad, dtype)
    return _rotate_eager(src, dim0, n, signs, pad, dtype)


def rotate_gemm(a: torch.Tensor, H: torch.Tensor, signs, pad: int) -> torch.Tensor:
    """GPU route: one [rows·(L+pad)/n, n] × [n, n] GeMM against diag(signs)·H, fp32 [rows, L + pad]."""
    rows, L = a.shape
    n = H.shape[0]
    R = H.float() if signs is None else signs.to(H.device, torch.float32)[:, None] * H.float()
    buf = (torch.zeros if pad else torch.empty)((rows, L + pad), dtype=torch.float32, device=a.device)
    buf[:, :L].copy_(a)  # layout, dtype and padding in one pass
    return (buf.view(-1, n) @ R).view(rows, L + pad)


def rotate(a: torch.Tensor, H: torch.Tensor, signs: torch.Tensor | None = None, pad: int = 0,
           dtype: torch.dtype = torch.float32, transposed: bool = False) -> torch.Tensor:
    """a [rows, L] (any float dtype, any layout), zero-padded to L + pad columns (a multiple of n), times
    blockdiag(R, R, ...) along the last dim, R = diag(signs)·H (signs ±1 [n] or None; H = H_n/√n fp32 [n, n],
    the layer's buffer): [rows, L + pad] in dtype. On CPU a transposed view (a.t() contiguous) is rotated in its
    own memory order and the result is a transposed view too (the quantizers read either layout). transposed:
    a is a contiguous b standing for the operand b.t(), rotated so without asking its strides (under
    torch.compile too); the result is the transposed view of a contiguous [L + pad, rows]."""
    n = H.shape[0]
    if transposed:
        if a.device.type != "cpu":
            return rotate_gemm(a.t(), H, signs, pad).to(dtype)
        return _rotate_physical(a, True, n, signs, pad, dtype).t()
    if a.device.type != "cpu":
        return rotate_gemm(a, H, signs, pad).to(dtype)
    if torch.compiler.is_compiling():  # no stride questions in a traced backward (dynamo: "autocast state changed")
        return _rotate_physical(a.contiguous(), False, n, signs, pad, dtype)
    if a.shape[0] > 1 and a.stride(0) == 1 and a.t().is_contiguous():
        return _rotate_physical(a.t(), True, n, signs, pad, dtype).t()
    return _rotate_physical(a.contiguous(), False, n, signs, pad, dtype)
