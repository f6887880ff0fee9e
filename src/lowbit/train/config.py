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
import logging
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import tomllib

from lowbit._io import to_toml
from lowbit.data.corpus import NAMED_CORPORA

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


def _opt(default, help: str, *, free: bool = False, per_run: bool = False, positive: bool = False,
         compare: bool = True, factory=None):
    """A TrainConfig field with its metadata, the one place each option is described:
    help      the help text of `lowbit train` / `lowbit compare` and of the TrainConfig docstring.
    free      may change on --resume without changing what is trained (other changes are warned about).
    per_run   set by `lowbit compare` for each run (not part of a comparison's shared base configuration).
    positive  must be > 0.
    compare   offered as a `lowbit compare` option (every run of a comparison shares it)."""
    meta = {"help": help, "free": free, "per_run": per_run, "positive": positive, "compare": compare and not per_run}
    return dataclasses.field(default=default, metadata=meta)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile(mode=...)


@dataclass
class TrainConfig:
    """One training run. Defaults train the 1.3M-parameter `tiny` GPT on 2M Shakespeare tokens.
    Every field below is a `lowbit train` option and a TOML key (generated list, from the field metadata):
    """

    model: str = _opt("tiny", "model preset (tiny, small, llama-tiny, ...; `lowbit flops --list` lists all, "
                              "with shapes and parameter counts)")
    recipe: str = _opt("fp32", "training recipe name (see `lowbit recipes`) or path to a recipe .toml file",
                       per_run=True)
    high_precision: str | None = _opt(None, "layers kept in high precision, replacing the recipe's own selection: "
                                            "comma-separated first:N, last:N (N a count or a share like 10%%), "
                                            "share:P%% (NVIDIA's split), module globs like *.attn.c_proj; "
                                            "'none' quantizes every block")
    data: str | None = _opt(None, "text/JSONL/Parquet file, directory or glob, or a built-in corpus: "
                                  f"{', '.join(NAMED_CORPORA)} (join them with +; default: shakespeare)")
    tokenizer: str = _opt("bpe", "bpe (trained locally on the corpus), bytes, or a saved tokenizer directory")
    vocab_size: int = _opt(2048, "BPE vocabulary size (ignored by the bytes tokenizer; the model uses the "
                                 "tokenizer's size)", positive=True)
    tokens: int = _opt(2_000_000, "training tokens (steps = tokens // (batch_size*seq_len*grad_accum)); "
                                  "accepts 2000000, 2M, 500k, 1.5B", free=True, positive=True)
    batch_size: int = _opt(16, "sequences per micro-batch (the global batch under several processes)", positive=True)
    seq_len: int = _opt(128, "tokens per sequence (at most the model's context)", positive=True)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", positive=True)
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine decay target)")
    warmup_steps: int | None = _opt(None, "linear warmup steps (default: 5%% of the steps)")
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay (matrices and embeddings only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping; the norm is still "
                                 "logged)")
    seed: int = _opt(0, "seed for the initial weights, the batch order and all RNGs")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:N", free=True)
    eval_interval: int = _opt(100, "steps between validation evaluations (and always at the last step)",
                              free=True, positive=True)
    eval_batches: int = _opt(10, "fixed validation batches per evaluation", free=True, positive=True)
    log_interval: int = _opt(10, "steps between logged metric rows", free=True, positive=True)
    stats_interval: int | None = _opt(None, "steps between per-layer quantization statistics (quant_stats.jsonl "
                                            "in the run directory; default: --log-interval; 0 = off, no cost)",
                                      free=True)
    ckpt_interval: int = _opt(200, "steps between checkpoints (a final one is always written)", free=True,
                              positive=True)
    keep_last: int = _opt(2, "checkpoints kept on disk (older ones are deleted)", free=True, positive=True)
    out: str = _opt("runs/default", "run directory (checkpoints, metrics, tokenizer, result.json)", free=True,
                    per_run=True)
    resume: bool = _opt(False, "continue from the newest valid checkpoint in --out", free=True, per_run=True)
    overwrite: bool = _opt(False, "delete lowbit's files in a non-empty --out and start again", free=True,
                           per_run=True)
    compile: bool = _opt(False, "torch.compile the model (falls back to eager, with a warning, if compiling "
                                "fails)", free=True)
    compile_mode: str = _opt("default", "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: "
                                        "for GPU steps bound by kernel launches) or max-autotune", free=True)
    fsdp: bool = _opt(False, "multi-process runs: shard the model with FSDP2 (fully_shard) instead of DDP",
                      free=True, compare=False)
    max_bad_steps: int = _opt(5, "consecutive non-finite steps skipped before the run stops as diverged",
                              free=True)
    val_fraction: float = _opt(0.05, "tail fraction of the token stream held out for validation (0 = none)")
    init_from: str | None = _opt(None, "a Hugging Face GPT-2/Llama directory (e.g. from `lowbit export`) whose "
                                       "architecture, weights and tokenizer replace --model/--tokenizer",
                                 compare=False)

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
        self._check_ranges()
        self.check_names()

    def _check_ranges(self) -> None:
        """Value ranges (types are checked first); ValueError naming the field."""
        for name in (f.name for f in dataclasses.fields(self) if f.metadata["positive"]):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.stats_interval is not None and self.stats_interval < 0:
            raise ValueError(f"stats_interval must be >= 0 (0 = no statistics), got {self.stats_interval}")
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
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: pick one")
        if not self.out:
            raise ValueError("out (the run directory) must not be empty")
        _check_device_string(self.device)

    def check_names(self) -> None:
        """Registry lookups: the model preset and the recipe (name or file) must exist."""
        from lowbit.models import get_config

        get_config(self.model)  # unknown preset -> ValueError with a suggestion
        self.resolved_recipe()  # unknown name / missing file / bad pattern -> ValueError / FileNotFoundError

    def resolved_recipe(self):
        """The Recipe this run trains with: `recipe` looked up, with `high_precision` (when set) as its
        layer selection."""
        from lowbit import recipes

        r = recipes.get(self.recipe)
        if self.high_precision is None:
            return r
        hp = () if self.high_precision.strip().lower() == "none" else self.high_precision
        return r.replace(high_precision=hp)

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

    def changed_on_resume(self, saved: dict) -> dict[str, tuple]:
        """{field: (saved value, this value)} of the fields that are not free on resume and differ from
        `saved` (a checkpoint's config dict)."""
        return {f.name: (saved.get(f.name), getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata["free"] and f.name in saved and saved.get(f.name) != getattr(self, f.name)}

    def check_resume(self, saved: dict, ckpt_dir) -> None:
        """Refuse to resume checkpoint `ckpt_dir` (trained with config dict `saved`) with a setting that changes
        what is trained (model, data, tokenizer, vocabulary, sequence length, recipe, optimizer, seed...): the run
        would silently become another one. Settings free on resume (tokens, intervals, device...) are accepted
        with a warning."""
        if saved.get("model") != self.model:
            raise ValueError(f"checkpoint {ckpt_dir} was trained with model={saved.get('model')!r}, this run has "
                             f"model={self.model!r}; resume with the same --model or use another --out")
        refused = self.changed_on_resume(saved)
        if refused:
            what = ", ".join(f"--{k.replace('_', '-')} {b!r} (the run has {a!r})" for k, (a, b) in refused.items())
            raise ValueError(f"cannot resume {Path(ckpt_dir).parent.parent} with {what}: that changes what is "
                             "trained; resume with the run's own settings, or start again with --overwrite or "
                             "another --out")
        free = {k: (saved.get(k), v) for k, v in self.to_dict().items()
                if k in saved and saved.get(k) != v and k not in ("resume", "overwrite", "out")}
        if free:
            logging.getLogger("lowbit.train").warning(
                "resuming with changed settings: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in free.items()))

    def shared_dict(self) -> dict:
        """The fields a comparison's runs share: all but the per-run ones (recipe, out, resume, overwrite)."""
        return {k: v for k, v in self.to_dict().items() if not _FIELDS[k].metadata["per_run"]}

    def to_toml(self) -> str:
        """Flat TOML of every field that is not None (None fields take their default on load)."""
        return to_toml(self.to_dict())


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def option_flag(name: str) -> str:
    """The command-line flag of TrainConfig field `name` ("batch_size" -> "--batch-size")."""
    return "--" + name.replace("_", "-")


def option_help(name: str) -> str:
    """The help text of TrainConfig field `name`."""
    return _FIELDS[name].metadata["help"]


def compare_fields() -> list[str]:
    """The fields `lowbit compare` offers as options (shared by every run)."""
    return [n for n, f in _FIELDS.items() if f.metadata["compare"]]


def _describe() -> str:
    lines = []
    for name, f in _FIELDS.items():
        tags = [t for t in ("free", "per_run") if f.metadata[t]]
        tag = f" [{', '.join(tags)}]" if tags else ""
        lines.append(f"      {name} = {f.default!r}: {f.metadata['help'].replace('%%', '%')}{tag}")
    return "\n".join(lines) + "\n    ([free]: may change on --resume; [per_run]: set per run by `lowbit compare`)\n"


TrainConfig.__doc__ = TrainConfig.__doc__.rstrip() + "\n" + _describe()


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
