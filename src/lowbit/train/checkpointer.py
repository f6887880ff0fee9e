"""CheckpointManager: the save policy of a run over lowbit.train.checkpoint's atomic, checksummed files.

It owns the interval, keep-last, the newest valid checkpoint to resume from (falling back past corrupt
ones), the refusal to save non-finite state, and the format: one safetensors file written by rank 0 (one
process, DDP), or, under FSDP2, every rank's shards through torch.distributed.checkpoint (lowbit.train.sharded). What it saves
is a dict of objects that each know their own `state_dict()` / `load_state_dict()`; the single-process
`state.pt` layout is {"optimizer", "schedule", step, bad_streak, streak_start, window_losses (the
TrainState's fields, at the top level), and one entry per other state ("batcher", "rng", "qlinear")}.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowbit._io import json_safe
from lowbit.train import checkpoint, dist, weights

log = logging.getLogger("lowbit.train")


class CheckpointManager:
    """Checkpoints of one run under `root` every `interval` steps, keeping the newest `keep_last`.
    `di`: the process group info (rank 0 writes); `sharded`: the model is FSDP2-sharded across ranks."""

    def __init__(self, root: Path, interval: int, keep_last: int, di: dist.DistInfo, sharded: bool = False):
        self.root, self.interval, self.keep_last = Path(root), interval, keep_last
        self.di, self.sharded = di, sharded
        self.last_saved: int | None = None  # a newer but corrupt checkpoint of the final step must be rewritten

    def latest(self) -> tuple[Path, dict] | None:
        """(dir, verified meta) of the newest valid checkpoint, None without any (CheckpointError if all
        are corrupt)."""
        return checkpoint.latest_valid(self.root)

    def due(self, step: int, steps: int) -> bool:
        """A periodic checkpoint after `step` (the final one is written by the run's end)."""
        return step % self.interval == 0 and step < steps

    def save(self, step: int, model: torch.nn.Module, optimizer, states: dict, meta: dict) -> bool:
        """Write checkpoint `step`; every rank calls this (FSDP2: each rank writes its shards with
        torch.distributed.checkpoint). Returns True when written; False (with a warning) when the weights or
        optimizer state are not finite. `model`: the wrapped model under FSDP2, else the model itself."""
        if self.sharded:
            from lowbit.train import sharded

            ok = sharded.save(self.root, step, model, optimizer, _flat(states), json_safe(meta), self.keep_last,
                              self.di)
            self.last_saved = step if ok else self.last_saved
            return ok
        if not self.di.is_main:
            return False
        opt_state = optimizer.state_dict()
        if not (checkpoint.all_finite(model) and checkpoint.all_finite(opt_state)):
            log.warning("step %d: not writing a checkpoint: the model or optimizer state has non-finite values",
                        step)
            return False
        checkpoint.save(self.root, step, model, {"optimizer": opt_state, **_flat(states)}, json_safe(meta),
                        self.keep_last)
        self.last_saved = step
        return True

    @staticmethod
    def load_weights(ckpt_dir: Path, model: torch.nn.Module, device) -> None:
        """Before wrapping: the weights of a single-file checkpoint into the plain model (a sharded one is
        loaded by `load`, into the wrapped model, resharded)."""
        if not checkpoint.is_sharded(ckpt_dir):
            weights.load_weights(model, ckpt_dir, device)

    def load(self, ckpt_dir: Path, model: torch.nn.Module, optimizer, states: dict) -> dict:
        """Restore the optimizer (and, for a sharded checkpoint, the weights: DCP reshards them to this job)
        and every state from `ckpt_dir`. `model`: the wrapped model. Returns the raw state."""
        state = checkpoint.load_state(ckpt_dir)
        if checkpoint.is_sharded(ckpt_dir):
            from lowbit.train import sharded

            sharded.load(ckpt_dir, model, optimizer)
        else:  # a full optimizer state; re-sharded like the parameters under FSDP2
            dist.load_full_optim_state(optimizer, state["optimizer"])
        for key, obj in states.items():
            if key == "train":
                obj.load_state_dict(state)
            elif key in state and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(state[key])
        self.last_saved = state["step"]
        return state


def _flat(states: dict) -> dict:
    """The state.pt entries of `states`: the TrainState's fields at the top level (the single-process layout),
    every other object's state_dict (plain dicts, e.g. the schedule, as they are) under its key."""
    out = {}
    for key, obj in states.items():
        d = obj.state_dict() if hasattr(obj, "state_dict") else obj
        if key == "train":
            out.update(d)
        else:
            out[key] = d
    return out
