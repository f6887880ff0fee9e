"""When quantization statistics are collected, and `quant_stats.jsonl`: the one owner of that schedule.

Statistics cost time (an extra pass per quantized operand), so they are sampled: collection is switched on for
the last step of every `stats_interval` window (default: the log interval; 0 = never, which costs nothing: no
extra pass runs) and for the last step. After a sampled step every QLinear's per-(GeMM, operand) statistics
(lowbit.nn.stats) become one JSON line each in RUN_DIR/quant_stats.jsonl:

    {"step": 40, "layer": "transformer.h.0.attn.c_attn", "gemm": "fprop", "operand": "input",
     "underflow": 0.08, "saturated": 0.0, "rel_err": 0.11, "sqnr_db": 19.2, "scale_log2_min": -9.0, ...}

and TensorBoard scalars `quant/<layer>/<gemm>/<operand>/<stat>` when the metrics logger has a writer. Under
DDP/FSDP2 rank 0 writes the statistics of its own micro-batches (the other ranks collect and drop theirs);
weights are the same on every rank, activations and gradients are rank 0's sample. On resume, records after
the checkpoint's step are dropped, as for metrics.jsonl. An MoE model's routers write, at the same steps, one
line each to RUN_DIR/moe_load.jsonl: {"step", "layer", "tokens" (per expert), "bias", "max_over_mean"}. Under --compile collection stays on (toggling it
would compile a second graph) and a record is the mean over its window.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lowbit.models.moe import load_records
from lowbit.nn.convert import collect_stats, layer_records
from lowbit.nn.stats import model_means

FILE = "quant_stats.jsonl"
MOE_FILE = "moe_load.jsonl"  # MoE models: per router, tokens per expert and the balancing bias, same steps


def read(run_dir, name: str = FILE) -> list[dict]:
    """Every record of RUN_DIR/quant_stats.jsonl (or `name`; NaN written as null comes back as NaN)."""
    path = Path(run_dir) / name
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in recs]


class StatsSchedule:
    """Switches statistics on for the steps that sample them, writes quant_stats.jsonl after them, and keeps the
    model-wide means of the sampled steps for the metrics (`pop_means`)."""

    def __init__(self, model, run_path, interval: int, steps: int, write: bool,
                 keep_until: int | None = None, tb=None):
        self.model, self.interval, self.steps = model, interval, steps
        self.path = Path(run_path) / FILE if write else None
        self.moe_path = Path(run_path) / MOE_FILE if write else None
        self.tb = tb
        self.on = False
        self._means: list[dict[str, float]] = []
        collect_stats(model, False)
        for path in (self.path, self.moe_path):
            if path is not None and path.exists():
                kept = [r for r in read(run_path, path.name) if keep_until is not None and r["step"] <= keep_until]
                path.write_text("".join(json.dumps(_json(r)) + "\n" for r in kept))

    def sampled(self, n: int) -> bool:
        return self.interval > 0 and (n % self.interval == 0 or n == self.steps)

    def before_step(self, n: int) -> None:
        want = self.sampled(n)
        if want != self.on:
            collect_stats(self.model, want)
            self.on = want

    def after_step(self, n: int) -> list[dict]:
        """Write step n's records (if it was sampled); returns them."""
        if not self.sampled(n):
            return []
        moe = [{"step": n, **r} for r in load_records(self.model)]
        if self.moe_path is not None and moe:
            with self.moe_path.open("a") as f:
                f.writelines(json.dumps(_json(r)) + "\n" for r in moe)
        recs = [{"step": n, **r} for r in layer_records(self.model)]
        if recs:
            self._means.append(model_means(recs))
        if self.path is not None and recs:
            with self.path.open("a") as f:
                f.writelines(json.dumps(_json(r)) + "\n" for r in recs)
            if self.tb is not None:
                for r in recs:
                    for k, v in r.items():
                        if isinstance(v, float) and math.isfinite(v):
                            self.tb.add_scalar(f"quant/{r['layer']}/{r['gemm']}/{r['operand']}/{k}", v, n)
        return recs


    def pop_means(self) -> dict[str, float]:
        """The metrics' model-wide means (lowbit.nn.stats.model_means) over the sampled steps since the last
        call (under --compile: the window's), then reset; {} when none was sampled."""
        keys = dict.fromkeys(k for m in self._means for k in m)
        out = {k: sum(m[k] for m in self._means if k in m) / sum(k in m for m in self._means) for k in keys}
        self._means = []
        return out


def _json(r: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
