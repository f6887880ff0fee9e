"""Run-time helpers of a training run: device, seeding, autocast, hashes, peak memory, the optimizer."""
from __future__ import annotations

import functools
import hashlib
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

from lowbit import recipes


def apply_recipe(model: torch.nn.Module, recipe: recipes.Recipe) -> torch.nn.Module:
    """The one way a model is prepared for a recipe (training, eval and generate alike): every nn.Linear but
    lm_head -> QLinear (lowbit.nn.convert), then the plain linears left get the CPU bf16 GeMM path
    (lowbit.cpu_bf16: same numbers, ~10x faster on CPUs without bf16 units). In place; returns model."""
    from lowbit.cpu_bf16 import upcast_cpu_linears
    from lowbit.nn import convert

    return upcast_cpu_linears(convert(model, recipe))


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu. Asking for cuda without CUDA raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu (or auto)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu (or auto)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast(recipe: recipes.Recipe, device: torch.device):
    """BF16 autocast when the recipe computes in bf16 (on CPU too), else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=recipe.compute_dtype == "bf16")


@functools.lru_cache(maxsize=None)
def say_cpu_peak(path: "torch.dtype | str") -> None:
    """Log which peak CPU MFU is measured against (a matmul dtype, or a GeMM path's name)."""
    logging.getLogger("lowbit.train").info("MFU is measured against this CPU's %s matmul peak",
                                           str(path).removeprefix("torch."))


MAX_PASSES = 1000  # more passes over the training split than this is a typo in --tokens, not a plan


def check_budget(cfg, n_train: int) -> int:
    """The optimizer steps of `cfg`'s token budget over a training split of `n_train` tokens; ValueError naming
    the fix for less than one step, a split shorter than one batch, or more than MAX_PASSES passes over it."""
    per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    if cfg.tokens < per_step:
        raise ValueError(f"tokens={cfg.tokens} is less than one optimizer step of batch_size*seq_len*grad_accum "
                         f"= {per_step} tokens; raise --tokens or lower --batch-size/--seq-len")
    if n_train < cfg.batch_size * cfg.seq_len + 1:  # every batch would repeat the same text
        raise ValueError(f"the training split has {n_train:,} tokens, less than one batch of batch_size*seq_len = "
                         f"{cfg.batch_size * cfg.seq_len:,}; use more --data or a smaller --batch-size/--seq-len")
    if cfg.tokens > MAX_PASSES * n_train:
        raise ValueError(f"--tokens {cfg.tokens:.3g} is {cfg.tokens / n_train:.3g} passes over the training split "
                         f"({n_train:,} tokens); lowbit refuses more than {MAX_PASSES:,} passes (a typo?): use "
                         "fewer --tokens or more --data")
    return cfg.tokens // per_step


def cpu_gemm(recipe: recipes.Recipe, device: torch.device) -> str | None:
    """The CPU bf16 GeMM path ("native"/"upcast") a run of `recipe` on `device` takes; None where none is taken
    (CUDA, fp32 compute). Checkpoints record it: the two paths differ in summation order."""
    from lowbit.cpu_bf16 import cpu_gemm_path

    if device.type != "cpu" or recipe.compute_dtype != "bf16":
        return None
    return cpu_gemm_path(torch.bfloat16)


def quant_kernels(device: torch.device) -> str:
    """Which quantizers a run on `device` uses: "cpu" or "triton" (lowbit's kernels) or "eager" (PyTorch ops)."""
    from lowbit import kernels

    return kernels.which(device.type)


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict entry, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def batch_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D parameters (matrices, embeddings) only; torch's fused kernel on CUDA and
    CPU (on the 2-core EPYC 5x the foreach step: 7.8 vs 39.5 ms for `small`'s 12.3M parameters; the same update
    up to the last bit of fp32 rounding), foreach elsewhere. `cfg`: a TrainConfig (lr, beta1, beta2, weight_decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kind)


class PeakMemory:
    """Peak memory of one run, measured by the run itself. CUDA: peak allocated bytes since start();
    Linux CPU: the process's resident-set high-water mark (VmHWM), reset at start(); elsewhere the
    process's peak RSS so far (it only grows across runs in one process). `source` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "cuda" if device.type == "cuda" else "trainer"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets VmHWM
            Path("/proc/self/clear_refs").write_text("5")
            self.source = "rss"
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "rss":
            hwm = _vm_hwm()
            if hwm is not None:
                return hwm
        return _max_rss()


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def progress_bar(progress: bool, steps: int, start: int):
    """The training loop's tqdm bar (steps), shown only when asked and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, unit="step", desc="train", dynamic_ncols=True,
                disable=not (progress and sys.stderr.isatty()))
