"""Trainer: one TrainConfig in, a trained model on disk and a TrainResult out (torchtitan-shaped).

    from lowbit.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4")).train()

`__init__` runs named setup phases in order: run directory (checked, not yet touched) -> data -> model
(initialised from `seed` BEFORE convert, so every recipe starts from the same weights; then
lowbit.nn.convert) -> optimizer -> batches -> the run directory is committed (only now is anything
written) -> resume from the newest valid checkpoint -> metrics. `train()` runs `train_step()` until the
token budget is spent, evaluating, logging and checkpointing when due, and returns the TrainResult.
Subclasses change one piece by overriding a factory (`build_model`, `make_optimizer`, `make_batcher`,
`compile`): that is how the tests inject faults.

Determinism: on CPU a run is a pure function of its config (same seed, same bits); a resumed run continues
bit for bit (optimizer, schedule position, batch RNG, torch/numpy/python RNGs and the quantized layers'
call counters and amax histories are all in `checkpoint_states()`, which the CheckpointManager saves).
The model has three handles: `model` (the module itself: what is saved and converted), `dist_model` (its DDP/FSDP2
wrapper, the model itself in one process) and `step_model` (what a step calls: `dist_model`, compiled under
--compile). `resume_ckpt` is the (directory, meta) of the checkpoint resumed from, `resumed_at_step` its step.
"""
from __future__ import annotations

import logging
import math
import signal
import time

import torch

from lowbit import flops as flops_mod
from lowbit.cpu_bf16 import check_resumed_path
from lowbit.data import Batcher, Tokenizer, eval_batches, prepare_dataset
from lowbit.models import config_to_dict
from lowbit.nn import check_block_sizes
from lowbit.nn.hardware import check_model
from lowbit.train import dist, forensics
from lowbit.train.checkpointer import CheckpointManager
from lowbit.train.config import TrainConfig
from lowbit.train.evaluation import eval_loss
from lowbit.train.metrics import BASE_COLUMNS, MetricsLogger, RowsOnly
from lowbit.train.qstats import StatsSchedule
from lowbit.train.result import StepTimer, TrainResult
from lowbit.train.rundir import RunDir
from lowbit.train.runtime import (
    PeakMemory,
    apply_recipe,
    autocast,
    batch_hash,
    check_budget,
    cpu_gemm,
    make_optimizer,
    progress_bar,
    quant_kernels,
    resolve_device,
    say_cpu_peak,
    seed_everything,
    state_dict_hash,
)
from lowbit.train.schedule import default_warmup, lr_at
from lowbit.train.signals import StopRequest, TrainingInterrupted
from lowbit.train.state import QLinearStates, RNGState, TrainState

log = logging.getLogger("lowbit.train")


class Trainer:
    """A training run of `cfg` (see the module docstring). `dataset` (a lowbit.data.Dataset) skips data
    preparation; `di`/`device`: this process's place in a torchrun job (default: one process)."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, dataset=None, di: dist.DistInfo | None = None,
                 device: torch.device | None = None):
        self.t_call = time.perf_counter()
        self.cfg, self.progress = cfg, progress
        self.recipe = cfg.resolved_recipe()
        self.di = dist.DistInfo() if di is None else di
        self.device = resolve_device(cfg.device) if device is None else device
        self._setup_run_dir()
        self.finished = self._finished_result()
        if self.finished is not None:  # resumed a finished run: nothing to do, no file is touched
            return
        self._setup_data(dataset)
        self._setup_model()
        self.optimizer = self.make_optimizer(self.model)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]  # what the clip sees
        self._setup_batches()
        if self.di.is_main:  # every input is checked by now: only from here on is the run directory changed
            self.run.commit(cfg.overwrite, cfg.to_toml(), self.tokenizer)
        self._setup_resume()
        self._setup_metrics()

    # --- factories (override to change one piece) ---------------------------------------------------

    def build_model(self, vocab_size: int) -> torch.nn.Module:
        from lowbit.models import build_model

        return build_model(self.cfg.model, vocab_size=vocab_size)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self.cfg, self.device)

    def make_batcher(self, tokens, batch_size: int, device=None, rank: int = 0, world_size: int = 1) -> Batcher:
        return Batcher(tokens, batch_size, self.cfg.seq_len, seed=self.cfg.seed, device=device, rank=rank,
                       world_size=world_size)

    def compile(self, model: torch.nn.Module) -> torch.nn.Module:
        from lowbit.train.compile import compile_model

        mode = self.cfg.compile_mode  # eager fallback (with a warning) if compiling fails
        return compile_model(model) if mode == "default" else compile_model(model, mode=mode)

    # --- setup phases --------------------------------------------------------------------------------

    def _setup_run_dir(self) -> None:
        cfg, world = self.cfg, self.di.world_size
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} (the global micro-batch) does not divide over {world} "
                             f"processes; use a multiple of {world}, e.g. --batch-size "
                             f"{world * max(1, cfg.batch_size // world)}")
        self.run = RunDir(cfg.out)
        dist.run_on_main(lambda: self.run.check(cfg.resume, cfg.overwrite), self.di)  # rank 0 checks
        self.sharded = cfg.fsdp and self.di.distributed
        self.ckpt = CheckpointManager(self.run.ckpt_root, cfg.ckpt_interval, cfg.keep_last, self.di, self.sharded)
        self.resume_ckpt = self.ckpt.latest() if cfg.resume else None
        if cfg.resume and self.resume_ckpt is None:
            log.warning("resume: no checkpoint in %s yet; starting from step 0", self.run.ckpt_root)
        if self.resume_ckpt is not None:
            cfg.check_resume(self.resume_ckpt[1].get("config", {}), self.resume_ckpt[0])

    def _finished_result(self) -> TrainResult | None:
        """The run's result.json when --resume finds the run already finished at this token budget."""
        if self.resume_ckpt is None:
            return None
        steps = self.cfg.tokens // (self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum)
        result = self.run.read_result() if self.resume_ckpt[1].get("step") == steps else None
        return None if result is None or result.get("steps") != steps else TrainResult.from_dict(result)

    def _setup_data(self, dataset) -> None:
        cfg, saved_tok = self.cfg, self.run.tokenizer
        resumed_tok = Tokenizer.load(saved_tok) if self.resume_ckpt and saved_tok.is_dir() else None
        self.init = None
        if cfg.init_from:  # (model, tokenizer) of a Hugging Face directory
            from lowbit.hf import load_pretrained

            self.init = load_pretrained(cfg.init_from)
        if dataset is None:
            tok_arg = resumed_tok or (self.init[1] if self.init else cfg.tokenizer)
            # rank 0 first (it builds the token/tokenizer caches), then the others read them
            dataset = dist.main_first(lambda: prepare_dataset(cfg.data, tokenizer=tok_arg, vocab_size=cfg.vocab_size,
                                                              val_fraction=cfg.val_fraction), self.di)
        self.dataset, self.tokenizer = dataset, dataset.tokenizer
        if resumed_tok is not None and resumed_tok.hash != self.tokenizer.hash:
            raise ValueError(f"the tokenizer differs from the one this run was trained with ({saved_tok}); "
                             "resume with the same --data/--tokenizer/--vocab-size")
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        self.steps = check_budget(cfg, len(dataset.train))
        self.warmup = default_warmup(self.steps) if cfg.warmup_steps is None else cfg.warmup_steps

    def _setup_model(self) -> None:
        cfg, vocab = self.cfg, self.tokenizer.vocab_size
        seed_everything(cfg.seed)  # identical initial weights for every recipe: init before convert
        model = self.build_model(vocab) if self.init is None else self.init[0]
        if vocab > model.config.vocab_size:  # (init_from with a foreign dataset= only)
            raise ValueError(f"the tokenizer has {vocab} tokens but {cfg.init_from} only "
                             f"{model.config.vocab_size} embeddings; use the tokenizer saved there")
        if cfg.seq_len > model.config.block_size:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds model {cfg.model!r}'s context of "
                             f"{model.config.block_size} tokens; use --seq-len {model.config.block_size} or less")
        self.init_hash = state_dict_hash(model)
        apply_recipe(model, self.recipe)
        check_block_sizes(model, self.recipe, cfg.model)
        model.to(self.device)
        check_model(model, self.device)  # gemm=hardware: one line naming what this device lacks, before any step
        if self.resume_ckpt is not None:
            ckpt_dir, meta = self.resume_ckpt
            if meta.get("vocab_size") != vocab:
                raise ValueError(f"checkpoint {ckpt_dir} has vocab_size {meta.get('vocab_size')}, the tokenizer has "
                                 f"{vocab}; resume with the same data and tokenizer")
            if cpu_gemm(self.recipe, self.device) is not None:
                check_resumed_path(meta.get("cpu_gemm"), str(ckpt_dir))
            self.ckpt.load_weights(ckpt_dir, model, self.device)
        self.model = model
        self.dist_model = dist.wrap(model, self.di, self.device, cfg.fsdp)  # the model itself in one process
        self.step_model = self.compile(self.dist_model) if cfg.compile else self.dist_model

    def _setup_batches(self) -> None:
        cfg, di, world = self.cfg, self.di, self.di.world_size
        local = cfg.batch_size // world  # rank r reads rows [r*local, (r+1)*local) of each global batch
        train = self.dataset.train
        self.batcher = self.make_batcher(train, local, self.device, di.rank, world)
        self.data_hash = batch_hash(*Batcher(train, cfg.batch_size, cfg.seq_len, seed=cfg.seed).next())
        self.val = []
        if len(self.dataset.val) > 0:
            self.val = list(eval_batches(self.dataset.val, local, cfg.seq_len, cfg.eval_batches, self.device,
                                         di.rank, world))
        else:
            log.info("no validation split (val_fraction=0): val_loss is not computed")

    def _setup_resume(self) -> None:
        self.train_state = TrainState()
        self.resumed_at_step, self.start_step = None, 0
        if self.resume_ckpt is None:
            return
        ckpt_dir = self.resume_ckpt[0]  # weights were loaded before wrapping
        self.ckpt.load(ckpt_dir, self.dist_model, self.optimizer, self.checkpoint_states())
        self.resumed_at_step = self.start_step = self.train_state.step
        log.info("resumed from %s (step %d of %d)", ckpt_dir, self.train_state.step, self.steps)
        if self.train_state.step > self.steps:
            raise ValueError(f"checkpoint {ckpt_dir} is at step {self.train_state.step}, past this run's {self.steps} "
                             "steps; raise --tokens to train further")

    def _setup_metrics(self) -> None:
        cfg = self.cfg
        self.fpt = flops_mod.flops_per_token(self.model.config, cfg.seq_len)["train"]
        try:
            dtype = torch.bfloat16 if self.recipe.compute_dtype == "bf16" else torch.float32
            fmt = "fp8" if self.recipe.gemm == "hardware" else "bf16"  # real FP8 GeMMs: the FP8 peak
            self.peak_flops = flops_mod.peak_flops(self.device, dtype, fmt) * self.di.world_size  # all devices
            if self.device.type == "cpu":
                say_cpu_peak("fp8 _scaled_mm" if fmt == "fp8" else flops_mod.cpu_peak_dtype(dtype))
        except ValueError as e:
            self.peak_flops = None
            log.info("MFU not reported: %s", e)
        self.memory = PeakMemory(self.device)
        self.memory.start()
        keep = self.train_state.step if cfg.resume else None
        self.logger = MetricsLogger(self.run.path, keep_until=keep) if self.di.is_main else RowsOnly()
        self.timer = StepTimer()
        self.model_stats: dict[str, float] = {}  # what the model's after_optimizer_step last returned (MoE load)
        interval = cfg.log_interval if cfg.stats_interval is None else cfg.stats_interval
        self.stats_schedule = StatsSchedule(self.model, self.run.path, interval, self.steps, write=self.di.is_main,
                                            keep_until=keep, tb=self.logger.tb_writer)

    # --- state ----------------------------------------------------------------------------------------

    def checkpoint_states(self) -> dict:
        """Everything a checkpoint holds besides the weights and the optimizer."""
        schedule = {"steps": self.steps, "warmup_steps": self.warmup, "lr": self.cfg.lr,
                    "min_lr_ratio": self.cfg.min_lr_ratio}
        return {"train": self.train_state, "schedule": schedule, "batcher": self.batcher, "rng": RNGState(self.device),
                "qlinear": QLinearStates(self.model)}

    def save(self, step: int) -> None:
        """Checkpoint `step` (every rank calls this: FSDP2 gathers shards on all of them)."""
        meta = {"config": self.cfg.to_dict(), "recipe": self.recipe.to_dict(),
                "model_config": config_to_dict(self.model.config), "vocab_size": self.tokenizer.vocab_size,
                "tokens": step * self.tokens_per_step, "init_hash": self.init_hash, "data_hash": self.data_hash,
                "cpu_gemm": cpu_gemm(self.recipe, self.device)}
        model = self.dist_model if self.sharded else self.model
        self.ckpt.save(step, model, self.optimizer, self.checkpoint_states(), meta)

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train to the end of the token budget (or divergence, or a signal); returns the TrainResult.
        SIGINT/SIGTERM: the current step finishes, a checkpoint is written, TrainingInterrupted is raised."""
        if self.finished is not None:
            log.info("%s already finished its %d steps; nothing to resume (raise --tokens to train further)",
                     self.run.path, self.finished.steps)
            return self.finished
        bar = progress_bar(self.progress and self.di.is_main, self.steps, self.train_state.step)
        diverged_at = None
        try:
            with StopRequest() as stop:
                self.model.train()
                while self.train_state.step < self.steps:
                    n, stop_now = self.train_step(stop)
                    self.stats_schedule.after_step(n)
                    bar.update(1)
                    diverged_at = self._diverged()
                    self._log_if_due(n, bar, last=n == self.steps or diverged_at is not None)
                    if diverged_at is not None:
                        break
                    if self.ckpt.due(n, self.steps):
                        self.save(n)
                    if stop_now and n < self.steps:
                        if self.ckpt.last_saved != n:
                            self.save(n)
                        log.warning("stopped at step %d of %d with a checkpoint", n, self.steps)
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, n)
                if diverged_at is None and self.ckpt.last_saved != self.steps:
                    self.save(self.steps)
        finally:
            bar.close()
            self.logger.close()
        return self._result(diverged_at)

    def step_model_for(self, n: int) -> torch.nn.Module:
        """What step n calls: under --compile a step that samples statistics runs the eager model (the same quantizers
        bit for bit), so the compiled graph holds none (no second graph, no tensors kept across CUDA-graph replays)."""
        return self.dist_model if self.cfg.compile and self.stats_schedule.on else self.step_model

    def train_step(self, stop: StopRequest | None = None) -> tuple[int, bool]:
        """One optimizer step of grad_accum micro-batches: forward/backward under the recipe's autocast, the
        global-norm clip, the AdamW update unless the loss or gradient is non-finite. Returns (steps done,
        whether any rank was asked to stop)."""
        cfg, di, t0 = self.cfg, self.di, time.perf_counter()
        step = self.train_state.step
        n = step + 1
        lr = lr_at(step, self.steps, cfg.lr, self.warmup, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.stats_schedule.before_step(n)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.batcher.next()
            y = y.contiguous()  # the batcher's targets are a strided view; the loss .view()s them
            # gradients are all-reduced (DDP) / reduce-scattered (FSDP2) after the last micro-batch only
            with dist.no_grad_sync(self.dist_model, di.distributed and i < cfg.grad_accum - 1):
                with autocast(self.recipe, self.device):
                    _, loss = self.step_model_for(n)(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        self._last_batch = (x, y)  # for the divergence forensics (lowbit.train.forensics)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = dist.clip_norm_value(torch.nn.utils.clip_grad_norm_(self.params, clip))  # global norm on every rank
        # mean loss over ranks and "a rank got SIGINT/SIGTERM" in one all-reduce: every rank decides alike
        asked = float(stop is not None and stop.signum is not None)
        shared = torch.stack([loss_sum / (cfg.grad_accum * di.world_size), torch.tensor(asked, device=self.device)])
        dist.all_reduce_sum(shared, di)
        loss_val, stop_now, grad_norm = torch.cat([shared, norm.float().reshape(1)]).tolist()  # one sync
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()  # then the model's own per-step update (MoE: the routers' balancing bias)
            self.model_stats = getattr(self.model, "after_optimizer_step", dict)()
        else:
            log.warning("step %d: non-finite %s (loss %s, grad norm %s); skipping the update (%d in a row, "
                        "the run stops after %d)", n, "loss" if not math.isfinite(loss_val) else "gradient",
                        loss_val, grad_norm, self.train_state.bad_streak + 1, cfg.max_bad_steps + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.train_state.record(n, loss_val, finite)
        self.lr, self.grad_norm = lr, grad_norm
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timer.add(time.perf_counter() - t0, first=step == self.start_step)
        return n, bool(stop_now)

    def _diverged(self) -> int | None:
        """The step the non-finite streak began, once it is longer than max_bad_steps."""
        s = self.train_state
        if s.bad_streak <= self.cfg.max_bad_steps:
            return None
        first = forensics.diagnose(self.model, self._last_batch, autocast(self.recipe, self.device), s.step,
                                   self.run.path if self.di.is_main else None)
        log.warning("stopping: %d non-finite steps in a row since step %d (max_bad_steps=%d); %s (details in %s)",
                    s.bad_streak, s.streak_start, self.cfg.max_bad_steps, forensics.describe(first),
                    self.run.path / forensics.FILE)
        return s.streak_start

    def evaluate_due(self, n: int, last: bool) -> bool:
        return bool(self.val) and (n % self.cfg.eval_interval == 0 or last)

    def should_log(self, n: int, last: bool) -> bool:
        return n % self.cfg.log_interval == 0 or self.evaluate_due(n, last) or last

    def _log_if_due(self, n: int, bar, last: bool) -> None:
        if not self.should_log(n, last):
            return
        qstats = self.stats_schedule.pop_means()  # this window's sampled steps
        val_loss = eval_loss(self.step_model, self.val, self.recipe, self.device, self.di) \
            if self.evaluate_due(n, last) else None
        tps = self.timer.window_tokens_per_s(self.tokens_per_step)
        losses = self.train_state.window_losses
        row = {"step": n, "tokens": n * self.tokens_per_step,
               "train_loss": sum(losses) / len(losses) if losses else float("nan"), "val_loss": val_loss,
               "lr": self.lr, "grad_norm": self.grad_norm, "tokens_per_s": tps, "mfu": self._mfu(tps), **qstats,
               **self.model_stats}
        self.logger.log(row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{tps:,.0f}")
        self.train_state.window_losses = []
        self.timer.new_window()

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops or not math.isfinite(tokens_per_s):
            return None
        return flops_mod.mfu(tokens_per_s, self.fpt, self.peak_flops)

    def _result(self, diverged_at: int | None) -> TrainResult:
        final_step, history = self.train_state.step, self.logger.rows
        step_time = self.timer.step_time()
        tps = self.tokens_per_step / step_time if step_time > 0 else float("nan")
        last_row = history[-1] if history else {}
        final_val = None
        if self.val:
            val_rows = [r for r in history if r.get("val_loss") is not None]
            final_val = val_rows[-1]["val_loss"] if val_rows and val_rows[-1]["step"] == final_step \
                else eval_loss(self.step_model, self.val, self.recipe, self.device, self.di)
        result = TrainResult(
            final_train_loss=float(last_row.get("train_loss", float("nan"))), final_val_loss=final_val,
            steps=final_step, tokens=final_step * self.tokens_per_step, tokens_per_s=tps, step_time_s=step_time,
            peak_mem_bytes=self.memory.peak(), peak_mem_source=self.memory.source,
            cpu_gemm=cpu_gemm(self.recipe, self.device), quant_kernels=quant_kernels(self.device),
            quant_stats={k: v for k, v in last_row.items() if k not in BASE_COLUMNS},
            wall_time_s=time.perf_counter() - self.t_call, diverged_at_step=diverged_at, history=list(history),
            init_hash=self.init_hash, data_hash=self.data_hash, out=str(self.run.path), mfu=self._mfu(tps),
            resumed_from_step=self.resumed_at_step)
        if self.di.is_main:
            self.run.write_result(result.to_dict())
        return result

