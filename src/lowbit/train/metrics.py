"""Metric rows -> metrics.jsonl, metrics.csv and (when installed) TensorBoard event files in `out/tb/`.

One row per logged step: step, tokens, train_loss, val_loss (None when not evaluated), lr, grad_norm,
tokens_per_s, mfu, and the recipe's quantization statistics. The CSV has a fixed header: the base
columns plus the quantization keys of the first row (rows are rewritten from the JSONL on resume).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from lowbit._io import json_safe

log = logging.getLogger("lowbit.train")

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
TB_DIR = "tb"
BASE_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"]


def read_rows(out: str | os.PathLike) -> list[dict]:
    p = Path(out) / JSONL
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn last line from a crash mid-write
                break
    return rows


_TB_HINT_SHOWN = False

class MetricsLogger:
    """Appends rows to the run's metric files. `keep_until`: on resume, rows with step > keep_until
    (logged after the checkpoint being resumed) are dropped so the files continue seamlessly."""

    def __init__(self, out: str | os.PathLike, keep_until: int | None = None, tensorboard: bool = True):
        self.out = Path(out)
        self.rows: list[dict] = []
        if keep_until is not None:
            self.rows = [r for r in read_rows(self.out) if r.get("step", 0) <= keep_until]
        self.columns: list[str] | None = None
        with open(self.out / JSONL, "w") as f:
            for r in self.rows:
                f.write(json.dumps(json_safe(r)) + "\n")
        self._jsonl = open(self.out / JSONL, "a")
        self._csv_file = open(self.out / CSV, "w", newline="")
        self._csv = None
        for r in self.rows:
            self._write_csv(r)
        self.tb_writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                global _TB_HINT_SHOWN
                if not _TB_HINT_SHOWN:  # once per process, not once per run of a comparison
                    _TB_HINT_SHOWN = True
                    log.info("tensorboard is not installed: no TensorBoard event files "
                             "(metrics.jsonl and metrics.csv are written; pip install tensorboard to get them)")
            else:
                self.tb_writer = SummaryWriter(log_dir=str(self.out / TB_DIR), purge_step=keep_until)

    def _write_csv(self, row: dict) -> None:
        if self._csv is None:
            self.columns = BASE_COLUMNS + [k for k in row if k not in BASE_COLUMNS]
            self._csv = csv.DictWriter(self._csv_file, fieldnames=self.columns, extrasaction="ignore")
            self._csv.writeheader()
        self._csv.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._jsonl.write(json.dumps(json_safe(row)) + "\n")
        self._jsonl.flush()
        self._write_csv(row)
        self._csv_file.flush()
        if self.tb_writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.tb_writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self.tb_writer is not None:
            self.tb_writer.close()


class RowsOnly:
    """MetricsLogger stand-in for ranks other than 0: keeps the rows, writes nothing."""

    tb_writer = None  # no TensorBoard on ranks other than 0

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass
