"""Sharded checkpoints under FSDP2, written and read with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the weights and of the optimizer state into `step_X/dcp/` (no rank
holds a full copy); rank 0 adds state.pt (the run's other states) and meta.json (the checksums of every
file), then renames the directory into place, as lowbit.train.checkpoint does for one process. Loading
goes through DCP's resharding: into FSDP2 on any number of ranks, DDP, or one process; `read_weights`
gathers full tensors in one process (no process group) for eval, generate and export.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from lowbit.train import checkpoint, dist

log = logging.getLogger("lowbit.train")


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    return dcp, sd


def save(root: Path, step: int, model: torch.nn.Module, optimizer, state: dict, meta: dict, keep_last: int,
         di: dist.DistInfo) -> bool:
    """Write checkpoint `step` (a collective: every rank calls it). `model`: the FSDP2-wrapped model.
    Returns False on every rank, writing nothing, when any rank's shards hold a non-finite value."""
    dcp, sd = _dcp()
    msd, osd = sd.get_state_dict(model, optimizer)
    bad = torch.tensor(float(not checkpoint.all_finite(_local({"m": msd, "o": osd}))))  # this rank's shards
    if float(dist.all_reduce_sum(bad, di)) > 0:
        if di.is_main:
            log.warning("step %d: not writing a checkpoint: the model or optimizer state has non-finite values",
                        step)
        return False
    tmp = Path(root) / f".tmp-{checkpoint.step_dir_name(step)}-sharded"
    if di.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover of the same step
        (tmp / checkpoint.SHARDED_DIR).mkdir(parents=True)
    dist.barrier(di)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / checkpoint.SHARDED_DIR))
    dist.barrier(di)  # every shard (and the coordinator's .metadata) is on disk
    if di.is_main:
        try:
            files = sorted(f"{checkpoint.SHARDED_DIR}/{p.name}" for p in (tmp / checkpoint.SHARDED_DIR).iterdir())
            for name in files:
                checkpoint.fsync_file(tmp / name)
            checkpoint.finish(tmp, step, state, meta, files)
            checkpoint.commit(tmp, Path(root), step, keep_last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier(di)
    return True


def load(ckpt_dir: Path, model: torch.nn.Module, optimizer) -> None:
    """Load a sharded checkpoint's weights and optimizer state into `model` (FSDP2, DDP or plain) and
    `optimizer`, resharded to this job's layout (a collective under a process group)."""
    _, sd = _dcp()
    msd, osd = sd.get_state_dict(model, optimizer)
    both = {"model": msd, "optim": osd}
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    _dcp_load(both, Path(ckpt_dir) / checkpoint.SHARDED_DIR, single)
    sd.set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])


def read_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full model state_dict of a sharded checkpoint, on CPU, in this process (no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = str(Path(ckpt_dir) / checkpoint.SHARDED_DIR)
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    target = {"model": weights}
    _dcp_load(target, Path(path), single=True)
    return target["model"]


def _dcp_load(target: dict, path: Path, single: bool) -> None:
    dcp, _ = _dcp()
    with warnings.catch_warnings():  # DCP warns on every single-process load, which is what we ask for here
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(target, checkpoint_id=str(path), no_dist=single)


def _local(x):
    """`x` with every DTensor replaced by this rank's shard (no communication)."""
    if torch.is_tensor(x):
        return x.to_local() if hasattr(x, "to_local") else x
    if isinstance(x, dict):
        return {k: _local(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_local(v) for v in x]
    return x
