"""Checkpoints: `out/ckpt/step_XXXXXXX/` holding

    model.safetensors   weights (safetensors; tied tensors stored once)
    state.pt            optimizer, schedule position, RNG states, batcher state (torch.save, loadable with
                        weights_only=True)
    meta.json           step, configs, vocab size, and the sha256 of the two files above; written last

Under FSDP2 (lowbit.train.sharded) the weights and optimizer state are instead written with
torch.distributed.checkpoint, each rank its own shard and no full copy anywhere: `dcp/` (`__<rank>_0.distcp`
files and `.metadata`) replaces model.safetensors and the optimizer entry of state.pt; meta.json lists the
sha256 of every file. Such a checkpoint resumes on another world size (DCP reshards on load), with or without
FSDP2, and lowbit.train.weights.load_weights (eval, generate, export) gathers it into full tensors in one
process.

Written atomically: into a temp dir inside `ckpt/`, every file fsynced, the dir renamed into place and
`ckpt/` fsynced, so a crash leaves either the whole checkpoint or none of it. A checkpoint is valid when
its meta.json parses and both checksums match; `latest_valid` skips (with a warning) the ones that are not.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from lowbit._io import publish_modes, sha256_file, temp_dir

log = logging.getLogger("lowbit.train")

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "dcp"  # sharded checkpoints: torch.distributed.checkpoint files, one per rank, plus .metadata
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files, unreadable, or fails its checksums."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def all_finite(obj) -> bool:
    """True when every floating-point tensor in `obj` is finite: a module (its state_dict), or a nested
    dict/list/tuple of tensors and plain values (e.g. an optimizer state_dict)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


class _StateDictWeights:
    """A full state_dict (e.g. gathered from FSDP2 shards) posing as a module for safetensors' save_model,
    which drops the duplicate names of shared (tied) tensors."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return dict(self._sd)


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every `step_XXXXXXX` directory under `ckpt_root`, newest first (not verified)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def save(ckpt_root: str | os.PathLike, step: int, model: torch.nn.Module | dict, state: dict, meta: dict,
         keep_last: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`. Returns its directory.
    `model`: the module, or its full state_dict (tied weights as one tensor object).
    `state` must hold only tensors and plain Python values (it is loaded with weights_only=True).
    An existing checkpoint of the same step (e.g. a corrupt one a resumed run fell back from) is replaced."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, f".tmp-{step_dir_name(step)}-")
    try:
        save_model(_StateDictWeights(model) if isinstance(model, dict) else model, str(tmp / MODEL_FILE))
        fsync_file(tmp / MODEL_FILE)
        finish(tmp, step, state, meta, [MODEL_FILE])
        return commit(tmp, root, step, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish(tmp: Path, step: int, state: dict, meta: dict, weight_files: list[str]) -> None:
    """Write state.pt and, last, meta.json (with the sha256 of every file: the weight files, relative to
    `tmp`, and state.pt) into the temporary checkpoint directory `tmp`, each fsynced."""
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
    fsync_file(tmp / STATE_FILE)
    files = {name: sha256_file(tmp / name) for name in [*weight_files, STATE_FILE]}
    with open(tmp / META_FILE, "w") as f:
        json.dump({**meta, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def commit(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """Rename the finished temporary directory `tmp` to checkpoint `step` (replacing one of the same step),
    fsync `root`, and delete all but the newest `keep_last` checkpoints. Returns the checkpoint directory."""
    publish_modes(tmp)
    final = root / step_dir_name(step)
    old = None
    if final.exists():  # rename cannot replace a non-empty directory: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, p in list_checkpoints(root)[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def clean_temp(ckpt_root: str | os.PathLike) -> None:
    """Remove temp dirs left by a crash during `save` (never a complete checkpoint)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def verify(ckpt_dir: str | os.PathLike) -> dict:
    """meta.json of a checkpoint whose files are all present and match their sha256; else CheckpointError."""
    d = Path(ckpt_dir)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} has no {META_FILE}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d}: unreadable {META_FILE} ({e})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    weights = MODEL_FILE if not is_sharded(d) else f"{SHARDED_DIR}/.metadata"
    if not isinstance(files, dict) or not {weights, STATE_FILE} <= set(files):
        raise CheckpointError(f"checkpoint {d}: {META_FILE} lists no checksums for {weights} and {STATE_FILE}")
    for name, digest in files.items():
        if not (d / name).is_file():
            raise CheckpointError(f"checkpoint {d} is missing {name}")
        if sha256_file(d / name) != digest:
            raise CheckpointError(f"checkpoint {d}: {name} does not match its sha256 in {META_FILE} (corrupt)")
    return meta


def latest_valid(ckpt_root: str | os.PathLike) -> tuple[Path, dict] | None:
    """Newest checkpoint under `ckpt_root` that passes `verify`, with its meta; corrupt newer ones are skipped
    with a warning. None when there is no checkpoint at all; CheckpointError when every one is corrupt."""
    found = list_checkpoints(ckpt_root)
    if not found:
        return None
    for _, d in found:
        try:
            return d, verify(d)
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint", e)
    raise CheckpointError(f"no valid checkpoint in {ckpt_root}: all {len(found)} are corrupt; "
                          "start again with --overwrite")


def resolve(path: str | os.PathLike) -> tuple[Path, dict]:
    """A checkpoint directory (has meta.json) or a run directory (uses its newest valid checkpoint)
    -> (checkpoint dir, verified meta)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a run directory (the trainer's --out) or one of its "
                                "ckpt/step_XXXXXXX directories")
    if (p / META_FILE).is_file():
        return p, verify(p)
    found = latest_valid(p / "ckpt")
    if found is None:
        if (p / "config.toml").is_file():  # a run directory (lowbit.train.rundir), stopped before its first one
            raise FileNotFoundError(f"run {p} has no checkpoint yet (one is written every --ckpt-interval steps and "
                                    "at the end); continue it with lowbit train --resume")
        raise FileNotFoundError(f"no checkpoint under {p}: expected {p}/ckpt/step_XXXXXXX/ "
                                "(pass the trainer's --out directory)")
    return found


def is_sharded(ckpt_dir: str | os.PathLike) -> bool:
    """A checkpoint written under FSDP2 with torch.distributed.checkpoint (lowbit.train.sharded)."""
    return (Path(ckpt_dir) / SHARDED_DIR).is_dir()


def load_state(ckpt_dir: str | os.PathLike, device="cpu") -> dict:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=True)
