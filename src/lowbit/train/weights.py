"""A checkpoint's weights, whichever kind it is: model.safetensors (one process, DDP) or FSDP2's DCP shards
(gathered into full tensors in this process). Used by resume, eval, generate and export."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model

from lowbit.train import checkpoint, sharded


def load_weights(model: torch.nn.Module, ckpt_dir: str | os.PathLike, device="cpu") -> None:
    """Load the checkpoint's weights into `model` (strict: every key must match): model.safetensors, or the
    shards of a sharded (FSDP2) checkpoint gathered into full tensors."""
    if checkpoint.is_sharded(ckpt_dir):
        missing, unexpected = _load_full(model, read_weights(ckpt_dir))
    else:
        missing, unexpected = load_model(model, Path(ckpt_dir) / checkpoint.MODEL_FILE, strict=False,
                                         device=str(device))
    if missing or unexpected:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt_dir} does not fit this model: missing keys "
                                         f"{missing[:5]}, unexpected keys {unexpected[:5]} (was it trained with "
                                         "another --model?)")


def read_weights(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's full model state_dict on CPU (safetensors, or a sharded checkpoint gathered here)."""
    if checkpoint.is_sharded(ckpt_dir):
        return sharded.read_weights(Path(ckpt_dir))
    return load_file(Path(ckpt_dir) / checkpoint.MODEL_FILE)


def _load_full(model: torch.nn.Module, sd: dict) -> tuple[list, list]:
    res = model.load_state_dict(sd, strict=False)
    return list(res.missing_keys), list(res.unexpected_keys)
