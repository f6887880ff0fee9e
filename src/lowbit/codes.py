"""4-bit codes of lowbit.quant.QTensor: sign << 3 | magnitude index into fmt.values(), two per byte along the
last dim (element 2i in the low nibble); NaN is kept in the otherwise redundant negative-zero code 0b1000."""
from __future__ import annotations

import math

import torch

from lowbit.formats import Format


def encode4(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    table = fmt.values().to(torch.float32).to(v.device)
    mag = torch.searchsorted(table, v.abs().nan_to_num(0.0)).to(torch.uint8)  # exact: v is on the grid
    neg = (v < 0).to(torch.uint8) << 3
    code = mag | neg
    return torch.where(v.isnan(), torch.tensor(8, dtype=torch.uint8, device=v.device), code)


def decode4(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    vals = fmt.values().to(torch.float32)
    table = torch.cat([vals, torch.tensor([math.nan]), -vals[1:]]).to(codes.device)
    return table[codes.long()]


def pack4(codes: torch.Tensor) -> torch.Tensor:
    lead, C = (tuple(codes.shape[:-1]), codes.shape[-1]) if codes.dim() else ((), 1)
    c = codes.reshape(math.prod(lead), C)
    if C % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).reshape(*lead, (C + 1) // 2)


def unpack4(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    lead, C = (tuple(shape[:-1]), shape[-1]) if len(shape) else ((), 1)
    p = packed.reshape(math.prod(lead), (C + 1) // 2)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], 2 * p.shape[1])[:, :C]
    return codes.reshape(shape)
