"""The training loop: one TrainConfig in, a trained model on disk and a TrainResult out.

    from lowbit.train import TrainConfig, train
    res = train(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4"))

Order of events (each a small function below): seed -> data -> model (initialised from `seed`
BEFORE convert, so every recipe starts from the same weights) -> lowbit.nn.convert(model, recipe) ->
AdamW -> optional resume from the newest valid checkpoint -> steps of
(grad_accum micro-batches under the recipe's autocast, clip, skip if non-finite, AdamW) with periodic
validation, metric rows and checkpoints -> final evaluation, checkpoint and result.json.

Determinism: on CPU a run is a pure function of its config (same seed, same bits); a resumed run
continues bit for bit (optimizer, schedule position, batch RNG and torch/numpy/python RNG states are
all in the checkpoint).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit import flops as flops_mod
from lowbit import recipes
from lowbit.cpu_bf16 import upcast_cpu_linears
from lowbit.data import Batcher, Tokenizer, eval_batches, prepare_dataset
from lowbit.models import GPTConfig, LlamaConfig, build_model
from lowbit.nn import QLinear, check_block_sizes, collect_stats, convert, quant_stats
from lowbit.train import checkpoint, dist
from lowbit.train.compile import compile_model
from lowbit.train.config import TrainConfig
from lowbit.train.metrics import BASE_COLUMNS, MetricsLogger, json_safe
from lowbit.train.schedule import default_warmup, lr_at

log = logging.getLogger("lowbit.train")

RESULT_FILE = "result.json"
CONFIG_FILE = "config.toml"
TOKENIZER_DIR = "tokenizer"
# What `overwrite` deletes from a run directory: only files lowbit writes there, never anything else.
_RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "metrics.csv", RESULT_FILE)
_RUN_DIRS = ("ckpt", TOKENIZER_DIR, "tb")
# Config fields that may change on resume without changing what is being trained.
_FREE_ON_RESUME = {"out", "resume", "overwrite", "device", "tokens", "compile", "fsdp", "eval_interval", "eval_batches",
                   "log_interval", "ckpt_interval", "keep_last", "max_bad_steps"}


@dataclass
class TrainResult:
    """Summary of a run (also written to `out/result.json`, non-finite floats as null).

    final_train_loss  mean training loss over the last logged window (nan if every step there was skipped).
    final_val_loss    validation loss at the end (None without a validation set).
    steps, tokens     optimizer steps run (skipped ones included) and tokens consumed.
    tokens_per_s      training throughput over this process's steps after the first (warm-up) one;
                      evaluation and checkpointing excluded.
    step_time_s       mean seconds per optimizer step, same steps.
    mfu               model FLOPs utilisation at tokens_per_s (None if the device's peak is unknown).
    peak_mem_bytes    CUDA: peak allocated memory; CPU: peak resident set size of the process.
    quant_stats       the recipe's quantization statistics (lowbit.nn.quant_stats) at the last logged step
                      ({} if the recipe quantizes nothing).
    wall_time_s       seconds from the call to the end, everything included.
    diverged_at_step  None, or the step where the streak of non-finite steps that stopped the run began.
    history           the logged metric rows (see lowbit.train.metrics), resumed runs included.
    init_hash         sha256 of the initial weights (before convert); equal across recipes with one seed.
    data_hash         sha256 of the first training batch.
    out               the run directory.
    resumed_from_step step of the checkpoint this run continued from (None if it started fresh).
    """

    final_train_loss: float
    final_val_loss: float | None
    steps: int
    tokens: int
    tokens_per_s: float
    step_time_s: float
    peak_mem_bytes: int
    quant_stats: dict
    wall_time_s: float
    diverged_at_step: int | None
    history: list = field(repr=False)
    init_hash: str
    data_hash: str
    out: str
    mfu: float | None = None
    resumed_from_step: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- small pieces -------------------------------------------------------------------------------

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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D parameters (matrices, embeddings) only; fused on CUDA, foreach
    elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kind)


def model_config_dict(config) -> dict:
    return {"family": config.family, **dataclasses.asdict(config)}


def model_config_from_dict(d: dict):
    d = dict(d)
    family = d.pop("family", "gpt")
    cls = {"gpt": GPTConfig, "llama": LlamaConfig}.get(family)
    if cls is None:
        raise ValueError(f"unknown model family {family!r} in checkpoint metadata")
    return cls(**d)


def _peak_mem(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _qlinear_state(model: torch.nn.Module) -> dict:
    """Every QLinear's LayerQuantState (generator states, amax histories), by module name."""
    return {fqn: m.qstate.quant_state_dict() for fqn, m in model.named_modules() if isinstance(m, QLinear)}


def _set_qlinear_state(model: torch.nn.Module, state: dict) -> None:
    for fqn, m in model.named_modules():
        if isinstance(m, QLinear) and fqn in state:
            m.qstate.load_quant_state_dict(state[fqn])


def _init_from(path: str):
    """(lowbit model, Tokenizer) from a Hugging Face directory, for continued pretraining (cfg.init_from)."""
    from lowbit.hf import load_pretrained

    return load_pretrained(path)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _prepare_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file, not a directory; choose another --out")
    try:  # a read-only or impossible --out fails here, before anything is computed or deleted
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lowbit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the run directory {out}: {e.strerror or e}; choose a writable --out "
                         "(or fix its permissions)") from None
    if any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise ValueError(f"run directory {out} already exists and is not empty; pass --resume to continue "
                         "it, --overwrite to start again (deletes its checkpoints and metrics), or another --out")
    return out


def _clear_run_files(out: Path) -> None:
    """--overwrite: delete lowbit's files in `out` (only those; called once every input has been checked)."""
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _check_resume(meta: dict, cfg: TrainConfig, vocab_size: int, ckpt_dir: Path) -> None:
    saved = meta.get("config", {})
    if saved.get("model") != cfg.model:
        raise ValueError(f"checkpoint {ckpt_dir} was trained with model={saved.get('model')!r}, this run has "
                         f"model={cfg.model!r}; resume with the same --model or use another --out")
    if meta.get("vocab_size") != vocab_size:
        raise ValueError(f"checkpoint {ckpt_dir} has vocab_size {meta.get('vocab_size')}, the tokenizer has "
                         f"{vocab_size}; resume with the same data and tokenizer")
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
               if k not in _FREE_ON_RESUME and k in saved and saved.get(k) != v}
    if changed:
        log.warning("resuming with changed settings (the run will not match an uninterrupted one): %s",
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def _eval_loss(model: torch.nn.Module, batches: list, recipe: recipes.Recipe, device: torch.device,
               di: dist.DistInfo | None = None) -> float:
    """Mean loss over fixed batches, in eval mode, under the recipe's autocast; with `di` (several ranks, each
    with its slice of every batch) the mean over ranks, i.e. the loss of the global batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad(), autocast(recipe, device):
        for x, y in batches:
            _, loss = model(x, y.contiguous())
            total += loss.double()
    model.train(was_training)
    if di is not None and di.distributed:
        dist.all_reduce_sum(total, di)
        total /= di.world_size
    return float(total) / len(batches)


def evaluate(model: torch.nn.Module, dataset, cfg: TrainConfig, recipe: recipes.Recipe | None = None,
             device: str | torch.device | None = None) -> dict:
    """Validation loss over `cfg.eval_batches` fixed batches of `dataset.val` (the run's own batches) and
    its perplexity exp(loss). `recipe` (default: cfg.recipe) sets the autocast dtype; `device` defaults
    to the model's."""
    recipe = recipes.get(cfg.recipe) if recipe is None else recipe
    device = next(model.parameters()).device if device is None else torch.device(device)
    if len(dataset.val) == 0:
        raise ValueError("the dataset has no validation split (val_fraction=0); nothing to evaluate")
    batches = list(eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device))
    loss = _eval_loss(model, batches, recipe, device)
    return {"val_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def _load(path, device="cpu"):
    """(model, tokenizer, cfg, recipe, ckpt_dir) from a run directory or checkpoint directory."""
    ckpt_dir, meta = checkpoint.resolve(path)
    run_dir = ckpt_dir.parent.parent
    tok = Tokenizer.load(run_dir / TOKENIZER_DIR)
    # the recipe is rebuilt from the checkpoint (the original .toml file, if any, may be gone)
    recipe = recipes.Recipe.from_dict(meta["recipe"])
    saved = dict(meta["config"])
    cfg = TrainConfig.from_dict({**saved, "recipe": "fp32"})
    cfg.recipe = saved["recipe"]
    device = resolve_device(str(device))
    model = build_model(model_config_from_dict(meta["model_config"]))
    convert(model, recipe)
    upcast_cpu_linears(model)
    checkpoint.load_weights(model, ckpt_dir)
    model.to(device).eval()
    return model, tok, cfg, recipe, ckpt_dir


def load_checkpoint(out_or_ckpt_dir, device="cpu"):
    """(model, tokenizer, cfg) from a run directory (its newest valid checkpoint) or a checkpoint directory.
    The model is converted with the recipe it was trained with, moved to `device`, in eval mode."""
    model, tok, cfg, _, _ = _load(out_or_ckpt_dir, device)
    return model, tok, cfg


# --- the loop -------------------------------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint of `step` was written (`signum`: the signal)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class _StopRequest:
    """SIGINT/SIGTERM handlers for the training loop: the first signal asks the loop to finish its step, write
    a checkpoint and raise TrainingInterrupted; a second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Ctrl-C pressed again: stop now. Not a copy of the first signal arriving right after it (torchrun
            # forwards the terminal's SIGINT to workers that already got it) and not a SIGTERM.
            if signum == self.signum == signal.SIGINT and time.monotonic() - self._t > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self._t = signum, time.monotonic()
        log.warning("received %s: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def train(cfg: TrainConfig, progress: bool = True, dataset=None) -> TrainResult:
    """Train per `cfg`; see the module docstring. `dataset` (a lowbit.data.Dataset) skips data preparation
    (cfg.data/tokenizer/vocab_size/val_fraction are then not used). Returns the TrainResult.

    Under torchrun (WORLD_SIZE > 1) this process joins the process group (lowbit.train.dist) and trains its
    slice of every global batch (cfg.batch_size is the global micro-batch) under DDP, or FSDP2 with cfg.fsdp.
    SIGINT/SIGTERM: the current step finishes, a checkpoint is written, TrainingInterrupted is raised."""
    t_call = time.perf_counter()
    recipe = recipes.get(cfg.recipe)
    di, device = dist.setup(resolve_device(cfg.device))
    try:
        return _train(cfg, progress, dataset, recipe, device, di, t_call)
    finally:
        dist.teardown(di)


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    out = _prepare_out(cfg)
    checkpoint.clean_temp(out / "ckpt")
    return out


def _train(cfg: TrainConfig, progress: bool, dataset, recipe: recipes.Recipe, device: torch.device,
           di: dist.DistInfo, t_call: float) -> TrainResult:
    world = di.world_size
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} (the global micro-batch) does not divide over {world} "
                         f"processes; use a multiple of {world}, e.g. --batch-size {world * max(1, cfg.batch_size // world)}")
    out = dist.run_on_main(lambda: _prepare_run_dir(cfg), di)  # only rank 0 touches the run directory
    ckpt_root = out / "ckpt"

    resume_from = None
    if cfg.resume:
        resume_from = checkpoint.latest_valid(ckpt_root)
        if resume_from is None:
            log.warning("resume: no checkpoint in %s yet; starting from step 0", ckpt_root)

    # data
    saved_tok = out / TOKENIZER_DIR
    init = _init_from(cfg.init_from) if cfg.init_from else None  # (model, tokenizer) of a Hugging Face dir
    if dataset is None:
        tok_arg = Tokenizer.load(saved_tok) if resume_from and saved_tok.is_dir() else \
            (init[1] if init else cfg.tokenizer)
        # rank 0 first (it builds the token/tokenizer caches), then the others read them
        dataset = dist.main_first(lambda: prepare_dataset(cfg.data, tokenizer=tok_arg, vocab_size=cfg.vocab_size,
                                                          val_fraction=cfg.val_fraction), di)
    tok = dataset.tokenizer
    if resume_from and saved_tok.is_dir() and Tokenizer.load(saved_tok).hash != tok.hash:
        raise ValueError(f"the tokenizer differs from the one this run was trained with ({saved_tok}); "
                         "resume with the same --data/--tokenizer/--vocab-size")

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    steps = cfg.tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"tokens={cfg.tokens} is less than one optimizer step of batch_size*seq_len*grad_accum = "
                         f"{tokens_per_step} tokens; raise --tokens or lower --batch-size/--seq-len")
    if len(dataset.train) < cfg.batch_size * cfg.seq_len + 1:  # every batch would repeat the same text
        raise ValueError(f"the training split has {len(dataset.train):,} tokens, less than one batch of "
                         f"batch_size*seq_len = {cfg.batch_size * cfg.seq_len:,}; use more --data or a smaller "
                         "--batch-size/--seq-len")
    warmup = default_warmup(steps) if cfg.warmup_steps is None else cfg.warmup_steps

    # model: identical initial weights for every recipe (init before convert)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, vocab_size=tok.vocab_size) if init is None else init[0]
    if tok.vocab_size > model.config.vocab_size:  # (init_from with a foreign dataset= only)
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but {cfg.init_from} only "
                         f"{model.config.vocab_size} embeddings; use the tokenizer saved there")
    if cfg.seq_len > model.config.block_size:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds model {cfg.model!r}'s context of "
                         f"{model.config.block_size} tokens; use --seq-len {model.config.block_size} or less")
    init_hash = state_dict_hash(model)
    convert(model, recipe)  # every nn.Linear but lm_head -> QLinear (plain F.linear for fp32/bf16)
    check_block_sizes(model, recipe, cfg.model)
    upcast_cpu_linears(model)  # lm_head: CPU bf16 autocast GeMMs in fp32 (same numbers, ~10x faster)
    model.to(device)
    if resume_from is not None:
        _check_resume(resume_from[1], cfg, tok.vocab_size, resume_from[0])
        checkpoint.load_weights(model, resume_from[0], device)
    model_fwd = dist.wrap(model, di, device, cfg.fsdp)  # the model itself in a single process
    sharded = cfg.fsdp and di.distributed
    fwd = compile_model(model_fwd) if cfg.compile else model_fwd  # eager fallback (with a warning) if compiling fails
    opt = make_optimizer(model, cfg, device)
    params = [p for g in opt.param_groups for p in g["params"]]

    local_batch = cfg.batch_size // world  # rank r reads rows [r*local_batch, (r+1)*local_batch) of each global batch
    batcher = Batcher(dataset.train, local_batch, cfg.seq_len, seed=cfg.seed, device=device, rank=di.rank,
                      world_size=world)
    data_hash = batch_hash(*Batcher(dataset.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed).next())
    if len(dataset.val) > 0:
        val = list(eval_batches(dataset.val, local_batch, cfg.seq_len, cfg.eval_batches, device, di.rank, world))
    else:
        val = []
        log.info("no validation split (val_fraction=0): val_loss is not computed")
    if di.is_main:  # every input is checked by now: only from here on is the run directory changed
        if cfg.overwrite:
            _clear_run_files(out)
        tok.save(saved_tok)
        (out / CONFIG_FILE).write_text(cfg.to_toml())

    start, bad_streak, streak_start = 0, 0, None
    resumed_from, resumed_window = None, []
    if resume_from is not None:
        ckpt_dir, meta = resume_from  # weights were loaded before wrapping
        state = checkpoint.load_state(ckpt_dir)
        dist.load_full_optim_state(opt, state["optimizer"])  # re-sharded like the parameters under FSDP2
        batcher.load_state_dict(state["batcher"])
        _set_rng_state(state["rng"], device)
        _set_qlinear_state(model, state.get("qlinear", {}))
        start, bad_streak, streak_start = state["step"], state["bad_streak"], state["streak_start"]
        resumed_from = start
        resumed_window = [float(v) for v in state.get("window_losses", [])]
        log.info("resumed from %s (step %d of %d)", ckpt_dir, start, steps)
        if start > steps:
            raise ValueError(f"checkpoint {ckpt_dir} is at step {start}, past this run's {steps} steps; "
                             "raise --tokens to train further")

    fpt = flops_mod.flops_per_token(model.config, cfg.seq_len)["train"]
    try:
        peak = flops_mod.peak_flops(device) * world  # MFU over all the job's devices
    except ValueError as e:
        peak = None
        log.info("MFU not reported: %s", e)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    logger = MetricsLogger(out, keep_until=start if cfg.resume else None) if di.is_main else _RowsOnly()
    history = logger.rows
    bar = _progress_bar(progress and di.is_main, steps, start)
    diverged_at = None
    last_saved = resumed_from  # a newer but corrupt checkpoint of the final step must be rewritten
    timed_s, timed_steps = 0.0, 0  # steady-state timing: this process's steps after its first
    win_losses, win_t, win_steps = resumed_window, 0.0, 0
    grad_norm = float("nan")
    qstats: dict = {}
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    # under --compile the statistics stay on: toggling them per window would compile a second graph
    always_stats = bool(cfg.compile)
    collect_stats(model, always_stats)
    stats_on = always_stats

    def ckpt_state(step: int, opt_state: dict) -> dict:
        return {"step": step, "optimizer": opt_state,
                "schedule": {"steps": steps, "warmup_steps": warmup, "lr": cfg.lr, "min_lr_ratio": cfg.min_lr_ratio},
                "batcher": batcher.state_dict(), "rng": _rng_state(device),
                "bad_streak": bad_streak, "streak_start": streak_start,
                # the open log window's losses, so the next logged train_loss matches an uninterrupted run
                "window_losses": list(win_losses), "qlinear": _qlinear_state(model)}

    def save(step: int) -> None:
        """Rank 0 writes the full state (gathered from every rank's shards under FSDP2: all ranks call this)."""
        nonlocal last_saved
        if not (di.is_main or sharded):
            return
        weights = dist.full_state_dict(model) if sharded else model
        opt_state = dist.full_optim_state(opt) if sharded else opt.state_dict()
        if not di.is_main:
            return
        if not (checkpoint.all_finite(weights) and checkpoint.all_finite(opt_state)):
            log.warning("step %d: not writing a checkpoint: the model or optimizer state has non-finite values",
                        step)
            return
        meta = {"config": cfg.to_dict(), "recipe": recipe.to_dict(), "model_config": model_config_dict(model.config),
                "vocab_size": tok.vocab_size, "tokens": step * tokens_per_step, "init_hash": init_hash,
                "data_hash": data_hash}
        checkpoint.save(ckpt_root, step, weights, ckpt_state(step, opt_state), json_safe(meta), cfg.keep_last)
        last_saved = step

    stop = _StopRequest()
    stop.install()
    interrupted = False
    try:
        model.train()
        for step in range(start, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, steps, cfg.lr, warmup, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            n = step + 1  # steps completed after this one
            # quantization statistics are sampled on the last step of each log window (they cost time)
            want = n % cfg.log_interval == 0 or n == steps or always_stats
            if want != stats_on:
                collect_stats(model, want)
                stats_on = want
            for i in range(cfg.grad_accum):
                x, y = batcher.next()
                y = y.contiguous()  # the batcher's targets are a strided view; the loss .view()s them
                # gradients are all-reduced (DDP) / reduce-scattered (FSDP2) after the last micro-batch only
                with dist.no_grad_sync(model_fwd, di.distributed and i < cfg.grad_accum - 1):
                    with autocast(recipe, device):
                        _, loss = fwd(x, y)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            norm = dist.clip_norm_value(torch.nn.utils.clip_grad_norm_(params, clip))  # global norm on every rank
            # mean loss over ranks and "a rank got SIGINT/SIGTERM", in one all-reduce: every rank takes the same
            # skip/stop decisions
            shared = torch.stack([loss_sum / (cfg.grad_accum * world),
                                  torch.tensor(float(stop.signum is not None), device=device)])
            dist.all_reduce_sum(shared, di)
            loss_val, stop_now, grad_norm = torch.cat([shared, norm.float().reshape(1)]).tolist()  # one sync
            if math.isfinite(loss_val) and math.isfinite(grad_norm):
                opt.step()
                bad_streak, streak_start = 0, None
                win_losses.append(loss_val)
            else:
                bad_streak += 1
                streak_start = n if bad_streak == 1 else streak_start
                log.warning("step %d: non-finite %s (loss %s, grad norm %s); skipping the update (%d in a row, "
                            "the run stops after %d)", n, "loss" if not math.isfinite(loss_val) else "gradient",
                            loss_val, grad_norm, bad_streak, cfg.max_bad_steps + 1)
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if step > start:
                timed_s, timed_steps = timed_s + dt, timed_steps + 1
            win_t, win_steps = win_t + dt, win_steps + 1
            bar.update(1)
            if bad_streak > cfg.max_bad_steps:
                diverged_at = streak_start
                log.warning("stopping: %d non-finite steps in a row since step %d (max_bad_steps=%d)",
                            bad_streak, streak_start, cfg.max_bad_steps)
            last = n == steps or diverged_at is not None
            do_eval = bool(val) and (n % cfg.eval_interval == 0 or last)
            if n % cfg.log_interval == 0 or do_eval or last:
                qstats = quant_stats(model)  # stats of this window's last step (under --compile: the window's mean)
                collect_stats(model, always_stats)
                stats_on = always_stats
                val_loss = _eval_loss(fwd, val, recipe, device, di) if do_eval else None
                tps = win_steps * tokens_per_step / win_t if win_t > 0 else float("nan")
                row = {"step": n, "tokens": n * tokens_per_step,
                       "train_loss": sum(win_losses) / len(win_losses) if win_losses else float("nan"),
                       "val_loss": val_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                       "mfu": flops_mod.mfu(tps, fpt, peak) if peak and math.isfinite(tps) else None, **qstats}
                logger.log(row)
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{tps:,.0f}")
                win_losses, win_t, win_steps = [], 0.0, 0
            if diverged_at is not None:
                break
            if n % cfg.ckpt_interval == 0 and n < steps:
                save(n)
            if stop_now and n < steps:
                if last_saved != n:
                    save(n)
                interrupted = True
                break
        else:
            n = steps
        if diverged_at is None and not interrupted and last_saved != steps:
            save(steps)
    finally:
        stop.restore()
        bar.close()
        logger.close()
    if interrupted:
        log.warning("stopped at step %d of %d with a checkpoint; continue with --resume", n, steps)
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, n)

    final_step = n  # == steps unless the run stopped early
    if timed_steps == 0 and win_steps:  # a one-step run: its only step is all we have
        timed_s, timed_steps = win_t, win_steps
    step_time = timed_s / timed_steps if timed_steps else float("nan")
    tps = tokens_per_step / step_time if timed_steps and step_time > 0 else float("nan")
    last_row = history[-1] if history else {}
    val_rows = [r for r in history if r.get("val_loss") is not None]
    final_val = None
    if val:
        final_val = val_rows[-1]["val_loss"] if val_rows and val_rows[-1]["step"] == final_step \
            else _eval_loss(fwd, val, recipe, device, di)
    result = TrainResult(
        final_train_loss=float(last_row.get("train_loss", float("nan"))),
        final_val_loss=final_val,
        steps=final_step, tokens=final_step * tokens_per_step,
        tokens_per_s=tps, step_time_s=step_time,
        peak_mem_bytes=_peak_mem(device),
        quant_stats={k: v for k, v in last_row.items() if k not in BASE_COLUMNS},
        wall_time_s=time.perf_counter() - t_call, diverged_at_step=diverged_at,
        history=list(history), init_hash=init_hash, data_hash=data_hash, out=str(out),
        mfu=flops_mod.mfu(tps, fpt, peak) if peak and math.isfinite(tps) else None,
        resumed_from_step=resumed_from,
    )
    if di.is_main:
        tmp = out / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(json_safe(result.to_dict()), indent=1) + "\n")
        os.replace(tmp, out / RESULT_FILE)
    return result


class _RowsOnly:
    """MetricsLogger stand-in for ranks other than 0: keeps the rows, writes nothing."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def _progress_bar(progress: bool, steps: int, start: int):
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, unit="step", desc="train", dynamic_ncols=True,
                disable=not (progress and sys.stderr.isatty()))
