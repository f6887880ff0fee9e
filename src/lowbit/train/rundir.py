"""RunDir: the one owner of a run directory's layout and of the rules for touching it.

    out/
      config.toml      the TrainConfig of the run (written once every input has been checked)
      metrics.jsonl    one row per logged step (lowbit.train.metrics); metrics.csv the same as CSV
      tb/              TensorBoard event files (when tensorboard is installed)
      tokenizer/       the tokenizer the run was trained with
      ckpt/step_XXXXXXX/   checkpoints (lowbit.train.checkpoint)
      result.json      the TrainResult, when the run finished

Nothing is created or deleted before `commit()`: `check()` only reads (an existing non-empty directory
needs --resume or --overwrite; a file or an unwritable place is refused), so a run that fails its input
checks leaves no trace. `--overwrite` deletes only the files lowbit writes, never anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lowbit._io import write_json
from lowbit.train import checkpoint

CONFIG_FILE = "config.toml"
RESULT_FILE = "result.json"
TOKENIZER_DIR = "tokenizer"
CKPT_DIR = "ckpt"
METRICS_FILES = ("metrics.jsonl", "metrics.csv")
TB_DIR = "tb"


class RunDir:
    """The run directory `path` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config = property(lambda self: self.path / CONFIG_FILE)
    result = property(lambda self: self.path / RESULT_FILE)
    tokenizer = property(lambda self: self.path / TOKENIZER_DIR)
    ckpt_root = property(lambda self: self.path / CKPT_DIR)

    def check(self, resume: bool, overwrite: bool) -> None:
        """ValueError naming the fix when the run may not use this directory; creates nothing."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ValueError(f"out={str(out)!r} is a file, not a directory; choose another --out")
        if resume and not overwrite and not out.exists():  # a typo in --out must not start a fresh run
            raise ValueError(f"--resume: run directory {out} does not exist, so there is nothing to resume; check "
                             "the path, or drop --resume to start a new run there")
        _check_writable(out)
        if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
            raise ValueError(f"run directory {out} already exists and is not empty; pass --resume to continue "
                             "it, --overwrite to start again (deletes its checkpoints and metrics), or another --out")
        checkpoint.clean_temp(self.ckpt_root)  # a crash's temp dirs, never a complete checkpoint

    def commit(self, overwrite: bool, config_toml: str, tokenizer) -> None:
        """Every input is checked: create the directory, clear an old run (overwrite), save tokenizer and config."""
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (CONFIG_FILE, RESULT_FILE, *METRICS_FILES):
                (self.path / name).unlink(missing_ok=True)
            for name in (CKPT_DIR, TOKENIZER_DIR, TB_DIR):
                shutil.rmtree(self.path / name, ignore_errors=True)
        tokenizer.save(self.tokenizer)
        self.config.write_text(config_toml)

    def write_result(self, result: dict) -> None:
        write_json(self.result, result)

    def read_result(self) -> dict | None:
        """The finished run's result.json, or None."""
        return json.loads(self.result.read_text()) if self.result.is_file() else None

    def has_checkpoint(self) -> bool:
        return bool(checkpoint.list_checkpoints(self.ckpt_root))

    @staticmethod
    def of_checkpoint(ckpt_dir: str | os.PathLike) -> "RunDir":
        """The run directory a `ckpt/step_XXXXXXX` directory belongs to."""
        return RunDir(Path(ckpt_dir).parent.parent)


def _check_writable(out: Path) -> None:
    """Probe the directory (or its nearest existing ancestor) with a temporary file that is removed at once."""
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(f"{probe_dir} is not a directory")
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to the run directory {out}: {e.strerror or e}; choose a writable --out "
                         "(or fix its permissions)") from None
