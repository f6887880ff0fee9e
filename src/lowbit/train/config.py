"""TrainConfig: the one object that drives a training run (torchtitan-style).

Every field is a `lowbit train` option (`--batch-size 16` for `batch_size`) and a TOML key:

    # run.toml
    model = "tiny"
    recipe = "fp4-paper"
    tokens = "2M"          # k / M / B suffixes accepted (also on the command line)
    lr = 1e-3

    cfg = TrainConfig.from_toml("run.toml", batch_size=32)   # keyword overrides win over the file

Unknown keys raise, naming them and listing the valid ones.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import tomllib

from lowbit._io import to_toml

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value) -> int:
    """A positive-or-zero whole count from an int or a string: 2000000, "2M", "1.5M", "500k", "1.5B",
    "2e6", "2_000_000" -> int. Raises ValueError for anything else (fractions, negatives, words)."""
    if isinstance(value, bool):
        raise ValueError(f"bad count {value!r}: use an integer, optionally with k/M/B, e.g. 2M")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"bad count {value!r}: must be a whole number")
        n = int(value)
    elif isinstance(value, str):
        s = value.strip().replace("_", "")
        mult = _SUFFIX.get(s[-1:].lower(), 1)
        num = s[:-1] if mult != 1 else s
        try:
            x = float(num) * mult
        except ValueError:
            raise ValueError(f"bad count {value!r}: use an integer, optionally with k/M/B, e.g. 2M") from None
        if not math.isfinite(x) or not x.is_integer():
            raise ValueError(f"bad count {value!r}: must be a whole number (e.g. 1.5M, not 1.0000001k)")
        n = int(x)
    else:
        raise ValueError(f"bad count {value!r}: use an integer, optionally with k/M/B, e.g. 2M")
    if n < 0:
        raise ValueError(f"bad count {value!r}: must not be negative")
    return n


@dataclass
class TrainConfig:
    """One training run. Defaults train the 1.3M-parameter `tiny` GPT on 2M Shakespeare tokens.

    What is trained
      model          model preset name (lowbit.models.PRESETS: tiny, small, gpt2-small, llama-...).
      recipe         recipe name (lowbit.recipes.names()) or path to a recipe .toml file.
      data           text/JSONL/Parquet file, directory or glob; None = the embedded Shakespeare corpus.
      tokenizer      "bpe" (trained locally on the corpus), "bytes", or a saved tokenizer directory.
      vocab_size     BPE vocabulary size (ignored for "bytes"; the model uses the tokenizer's size).
      val_fraction   tail fraction of the token stream held out for validation (0 = no validation).
    How long, how big
      tokens         training tokens; steps = tokens // (batch_size * seq_len * grad_accum).
                     Accepts "2M", "500k", "1.5B".
      batch_size     sequences per micro-batch.
      seq_len        tokens per sequence (at most the model's block_size).
      grad_accum     micro-batches per optimizer step.
    Optimizer (AdamW; decay only on >= 2-D parameters) and schedule
      lr             peak learning rate.
      min_lr_ratio   final learning rate as a fraction of lr (cosine decay target).
      warmup_steps   linear warmup steps; None = 5% of the steps.
      weight_decay   decoupled weight decay for matrices/embeddings.
      beta1, beta2   AdamW betas.
      grad_clip      clip the global gradient norm to this (0 = no clipping; the norm is still logged).
    Run control
      seed           seeds the initial weights, the batch order and torch/numpy/python RNGs.
      device         "auto" (cuda when available), "cpu", "cuda", "cuda:N".
      eval_interval  steps between validation evaluations (and always at the last step).
      eval_batches   fixed validation batches per evaluation.
      log_interval   steps between metric rows (metrics.jsonl / metrics.csv / TensorBoard).
      ckpt_interval  steps between checkpoints (a final one is always written).
      keep_last      checkpoints kept on disk (older ones are deleted).
      out            run directory.
      resume         continue from the newest valid checkpoint in `out`.
      overwrite      delete lowbit's files in a non-empty `out` and start again.
      compile        torch.compile the model (falls back to eager, with a warning, if compiling fails).
      init_from      a Hugging Face GPT-2/Llama directory (e.g. from `lowbit export --to hf`) to start from:
                     its architecture, weights and tokenizer replace `model` and `tokenizer` (continued
                     pretraining); None = train from scratch.
      fsdp           under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard)
                     instead of replicating them with DDP. No effect in a single process.
      max_bad_steps  consecutive non-finite steps tolerated (each skipped); one more stops the run.
    """

    model: str = "tiny"
    recipe: str = "fp32"
    data: str | None = None
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    tokens: int = 2_000_000
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    eval_interval: int = 100
    eval_batches: int = 10
    log_interval: int = 10
    ckpt_interval: int = 200
    keep_last: int = 2
    out: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    compile: bool = False
    fsdp: bool = False
    max_bad_steps: int = 5
    val_fraction: float = 0.05
    init_from: str | None = None

    def __post_init__(self):
        try:
            self.tokens = parse_count(self.tokens)
        except ValueError as e:
            raise ValueError(f"tokens: {e}") from None
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)
        if isinstance(self.recipe, os.PathLike):
            self.recipe = os.fspath(self.recipe)
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        if isinstance(self.init_from, os.PathLike):
            self.init_from = os.fspath(self.init_from)
        _check_types(self)
        positive = ("tokens", "batch_size", "seq_len", "grad_accum", "vocab_size", "eval_interval",
                    "eval_batches", "log_interval", "ckpt_interval", "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (or None for 5% of the steps), got {self.warmup_steps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if self.max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: pick one")
        if not self.out:
            raise ValueError("out (the run directory) must not be empty")
        _check_device_string(self.device)
        from lowbit import recipes
        from lowbit.models import PRESETS

        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; known presets: {', '.join(PRESETS)}")
        recipes.get(self.recipe)  # unknown name / missing file -> ValueError / FileNotFoundError naming it

    # --- TOML ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        """Config from a dict (e.g. parsed TOML); `overrides` win. Unknown keys raise ValueError."""
        merged = {**d, **overrides}
        known = field_names()
        bad = [k for k in merged if k not in known]
        if bad:
            raise ValueError(f"unknown TrainConfig key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                             f"valid keys: {', '.join(known)}")
        return cls(**merged)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Load a flat TOML file of TrainConfig keys; keyword `overrides` (e.g. from the command line) win."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"invalid TOML in config file {p}: {e}") from None
        nested = [k for k, v in data.items() if isinstance(v, dict)]
        if nested:
            raise ValueError(f"config file {p}: tables {nested} are not supported; TrainConfig keys are flat "
                             f"(e.g. 'lr = 1e-3' at the top level)")
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as e:
            raise ValueError(f"config file {p}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Flat TOML of every field that is not None (None fields take their default on load)."""
        return to_toml(self.to_dict())


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_types() -> dict[str, type]:
    """Field name -> the non-None base type (int, float, str, bool)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, t in hints.items():
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = args[0] if args else t
    return out


def _check_types(cfg: TrainConfig) -> None:
    """Coerce ints to floats for float fields; reject wrong types with a message naming the field."""
    hints = typing.get_type_hints(TrainConfig)
    for name, base in field_types().items():
        v = getattr(cfg, name)
        optional = type(None) in typing.get_args(hints[name])
        if v is None:
            if optional:
                continue
            raise ValueError(f"{name} must not be None")
        if base is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            setattr(cfg, name, float(v))
        elif base is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(cfg, name, v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        elif base is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        elif base is str:
            if not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {v!r}")


def _check_device_string(device: str) -> None:
    head, _, idx = device.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (idx and not (head == "cuda" and idx.isdigit())):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
