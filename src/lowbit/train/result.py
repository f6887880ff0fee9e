"""TrainResult, the summary of a run, and StepTimer, which measures its steady-state step time."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    peak_mem_bytes    peak memory of this run; peak_mem_source says how it was measured: "cuda" (peak
                      allocated), "rss" (Linux: the process's resident-set high-water mark, reset at the start
                      of the run) or "trainer" (the process's peak RSS so far, which only grows across runs).
    cpu_gemm          on CPU under a bf16/fp16 recipe: "native" (torch's bf16 GeMMs) or "upcast" (fp32 GeMMs of
                      the upcast operands), as lowbit.cpu_bf16 decided for this machine; else None.
    quant_kernels     the quantizers that ran: "cpu" (lowbit's compiled CPU kernels), "triton" (its Triton kernel
                      on CUDA, eager beside it) or "eager" (PyTorch ops; the same numbers, see lowbit.kernels).
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
    peak_mem_source: str | None = None
    cpu_gemm: str | None = None
    quant_kernels: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainResult":
        """From a result.json (unknown keys ignored, None floats back to nan)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("final_train_loss", "tokens_per_s", "step_time_s"):
            if kw.get(k) is None:
                kw[k] = float("nan")
        return cls(**kw)


class StepTimer:
    """Seconds per optimizer step. The steady-state mean leaves out this process's first step (warm-up:
    allocations, lazy compilation); a run of a single step reports that step. `window_*` is the current
    logging window (all its steps)."""

    def __init__(self):
        self.timed_s, self.timed_steps = 0.0, 0
        self.first_s = None
        self.win_s, self.win_steps = 0.0, 0

    def add(self, dt: float, first: bool) -> None:
        if first:
            self.first_s = dt
        else:
            self.timed_s, self.timed_steps = self.timed_s + dt, self.timed_steps + 1
        self.win_s, self.win_steps = self.win_s + dt, self.win_steps + 1

    def new_window(self) -> None:
        self.win_s, self.win_steps = 0.0, 0

    def window_tokens_per_s(self, tokens_per_step: int) -> float:
        return self.win_steps * tokens_per_step / self.win_s if self.win_s > 0 else float("nan")

    def step_time(self) -> float:
        if self.timed_steps:
            return self.timed_s / self.timed_steps
        return self.first_s if self.first_s is not None else float("nan")
