"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr.

A pure function of the step, so a resumed run needs nothing but the step to continue it.
"""
from __future__ import annotations

import math


def default_warmup(steps: int) -> int:
    """5% of the steps (rounded down)."""
    return int(0.05 * steps)


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer update number `step` (0-based, 0 <= step < steps).

    warmup (step < W):   lr * (step + 1) / W                     -- reaches lr at the end of warmup
    decay  (step >= W):  min + (lr - min) * (1 + cos(pi * p)) / 2,  p = (step - W) / (steps - W - 1)
                         clipped to [0, 1], min = min_lr_ratio * lr -- lr at the first decay step,
                         exactly min at the last step (a single decay step gets lr).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    lo = min_lr_ratio * lr
    span = steps - warmup_steps - 1
    p = 0.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
