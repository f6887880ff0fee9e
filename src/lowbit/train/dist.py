"""Process-group helpers for multi-process training (torchrun; DDP or FSDP2).

    torchrun --standalone --nproc-per-node 2 -m lowbit train --model tiny --out runs/x           # DDP
    torchrun --standalone --nproc-per-node 2 -m lowbit train --model tiny --out runs/x --fsdp    # FSDP2
    lowbit train --nproc 2 ...                                     # the same, launched for you (launch())

`train()` calls `setup()`: under torchrun (WORLD_SIZE > 1 in the environment) it joins the process group
(gloo on CPU, nccl on CUDA, one GPU per local rank); otherwise it is a no-op and everything below
degrades to single-process behaviour, so the trainer has one code path.

Checkpoints: under FSDP2 every rank writes its own shards (lowbit.train.sharded); one process and DDP write
the single-process format from rank 0. `load_full_optim_state` re-shards a single-process optimizer state
onto FSDP2 parameters (resuming such a checkpoint under --fsdp); `full_state_dict` / `full_optim_state`
gather a sharded model's full state in the single-process layout, for callers that want one file.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `initialized`: setup() created the process group (and destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class MainRankError(ValueError):
    """A ValueError raised on rank 0 and re-raised, with the same message, on every other rank."""


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def info() -> DistInfo:
    """The current process group as a DistInfo (single process when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """One accelerator per process: cuda (no index) -> cuda:LOCAL_RANK. An explicit cuda:N with several
    processes would put them all on one GPU, so it is refused."""
    if device.type != "cuda":
        return device
    if device.index is not None and env_world_size() > 1:
        raise ValueError(f"--device {device} pins every process to one GPU; under torchrun use --device cuda "
                         "(or auto): rank r uses cuda:LOCAL_RANK")
    return torch.device("cuda", local_rank)


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo for CPU, nccl for CUDA) and return
    (DistInfo, this rank's device). A group that already exists (e.g. created by the caller) is reused."""
    world = env_world_size()
    if world <= 1 or not dist.is_available():
        return info(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return info(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    i = info()
    return DistInfo(i.rank, i.world_size, local_rank, initialized=True), device


def teardown(di: DistInfo) -> None:
    """Destroy the process group if setup() created it."""
    if di.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(di: DistInfo) -> None:
    if di.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """Sum of `t` over ranks (in place; a no-op in a single process)."""
    if di.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def run_on_main(fn, di: DistInfo):
    """Run `fn()` on rank 0 only and broadcast its result. A ValueError/FileNotFoundError there is re-raised
    on every rank (MainRankError elsewhere), so a bad input stops all ranks with one message instead of
    leaving the others waiting in a collective."""
    if not di.distributed:
        return fn()
    box = [None, None]
    if di.is_main:
        try:
            box[0] = fn()
        except (ValueError, FileNotFoundError) as e:
            box[1] = (type(e).__name__, str(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise MainRankError(box[1][1])
    return box[0]


# --- wrapping ---------------------------------------------------------------------------------------

def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the elements of every outermost nn.ModuleList (a mixture-of-experts layer's
    experts are inside a block and are sharded with it: FSDP2 cannot shard a parameter twice)."""
    outer: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
    mods = dict(model.named_modules())
    return [b for name in outer for b in mods[name]]


def wrap(model: nn.Module, di: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (default) or FSDP2 for a model already on `device`; the model itself in a single process.

    FSDP2 (`fully_shard`) shards each transformer block and then the root, in place: parameters become
    DTensors sharded on dim 0 and are all-gathered (to full fp32 masters) right before each block's forward,
    so QLinear quantizes the gathered weight exactly as in one process. Returns the module to call."""
    if not di.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (di.world_size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # no buffer sync in forward: QLinear's delayed-scaling amax histories are per-rank statistics of each rank's
    # own activations; the persistent buffers are identical on every rank from the same seed/checkpoint.
    import inspect

    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}  # (renamed in newer torch)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def no_grad_sync(wrapped: nn.Module, enabled: bool):
    """Context for a micro-batch whose gradients need no all-reduce yet (all but the last of grad_accum)."""
    if not enabled:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# --- full state dicts (checkpoints) ----------------------------------------------------------------

def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full_tensor(x: torch.Tensor) -> torch.Tensor:
    """DTensor -> the full tensor on CPU (a collective: every rank calls it, in the same order); tensor -> CPU."""
    t = (x.full_tensor() if _is_dtensor(x) else x).detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view into FSDP2's padded all-gather buffer: own storage (safetensors needs it)
    return t


def _full(x):
    if torch.is_tensor(x):
        return _full_tensor(x)
    if isinstance(x, dict):
        return {k: _full(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_full(v) for v in x)
    return x


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every sharded tensor gathered, on CPU. Tied weights (one Parameter under two
    names) stay one tensor object, so safetensors stores them once. Collective under FSDP2 (call on every rank;
    the tie structure is the same on every rank, so every rank gathers the same tensors in the same order)."""
    owner = {name: id(t) for name, t in [*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False)]}
    out, done = {}, {}
    for name, t in model.state_dict().items():
        key = owner.get(name, name)
        if key not in done:
            done[key] = _full_tensor(t)
        out[name] = done[key]
    return out


def full_optim_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with sharded (DTensor) moments gathered: the single-process format.
    Collective under FSDP2 (call on every rank)."""
    return _full(opt.state_dict())


def load_full_optim_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process-format optimizer state; moments of DTensor (FSDP2-sharded) parameters are
    re-sharded like their parameter (each rank keeps its own chunk; no communication)."""
    opt.load_state_dict(state)
    from torch.distributed.tensor import distribute_tensor

    for group in opt.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p) or p not in opt.state:
                continue
            st = opt.state[p]
            for k, v in st.items():
                if torch.is_tensor(v) and not _is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                              src_data_rank=None)


def clip_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (a replicated DTensor under FSDP2)."""
    return norm.full_tensor() if _is_dtensor(norm) else norm


# --- launcher ---------------------------------------------------------------------------------------

def launch(nproc: int, argv: list[str]) -> int:
    """`lowbit <argv>` in `nproc` processes on this machine via torchrun (torch.distributed.run, standalone
    rendezvous on a free port). Returns the exit status: 0, or the first failed rank's status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun prints a banner and sets 1 thread per process when OMP_NUM_THREADS is unset: set it ourselves,
    # to this machine's cores shared out over the processes
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "lowbit", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c and c > 0), 1)
    except SignalException as e:  # Ctrl-C / SIGTERM: torchrun passed it on to the workers (they checkpoint)
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or env_world_size() > 1



def main_first(fn, di: DistInfo):
    """`fn()` on rank 0, then (once it succeeded) on the other ranks, then a barrier: for steps that fill a
    cache the others then read (tokenizer, token files). Each rank returns its own result. An input error on
    rank 0 is re-raised everywhere (see run_on_main)."""
    if not di.distributed:
        return fn()
    out, box = None, [None]  # results are not broadcast (datasets hold memmaps): each rank builds its own
    if di.is_main:
        try:
            out = fn()
        except (ValueError, FileNotFoundError) as e:
            box[0] = str(e)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise MainRankError(box[0])
    if not di.is_main:
        out = fn()
    barrier(di)
    return out
