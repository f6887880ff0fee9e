"""The checkpointed states of a run that are not the model's or optimizer's own: each object knows its
`state_dict()` / `load_state_dict()`, so the CheckpointManager saves a dict of them without knowing them.

    TrainState   step, the non-finite streak, the open log window's losses
    RNGState     torch / numpy / python (and CUDA) generators of the process
    QLinearStates every quantized layer's LayerQuantState (call counters, amax histories), by module name
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.nn import QLinear


@dataclass
class TrainState:
    """Where the run is. step: optimizer steps done; bad_streak: consecutive non-finite steps, the streak
    starting at step streak_start; window_losses: the losses of the open log window (so the next logged
    train_loss of a resumed run matches an uninterrupted one)."""

    step: int = 0
    bad_streak: int = 0
    streak_start: int | None = None
    window_losses: list = field(default_factory=list)

    def record(self, n: int, loss: float, finite: bool) -> None:
        """Step `n` (1-based) ended with `loss`; `finite`: loss and gradient norm finite (update applied)."""
        self.step = n
        if finite:
            self.bad_streak, self.streak_start = 0, None
            self.window_losses.append(loss)
        else:
            self.bad_streak += 1
            self.streak_start = n if self.bad_streak == 1 else self.streak_start

    def state_dict(self) -> dict:
        return {"step": self.step, "bad_streak": self.bad_streak, "streak_start": self.streak_start,
                "window_losses": list(self.window_losses)}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.bad_streak, self.streak_start = d["step"], d["bad_streak"], d["streak_start"]
        self.window_losses = [float(v) for v in d.get("window_losses", [])]


class RNGState:
    """The process's random generators (what dropout, sampling and numpy/python code draw from)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        np_state = np.random.get_state(legacy=False)
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "python": random.getstate(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())
        n = state["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
        random.setstate(_as_tuple(state["python"]))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class QLinearStates:
    """Every QLinear's LayerQuantState in `model`, keyed by module name (checkpointed so that resume is exact
    for stochastic rounding and delayed scaling)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return {fqn: m.qstate.quant_state_dict() for fqn, m in self.model.named_modules() if isinstance(m, QLinear)}

    def load_state_dict(self, state: dict) -> None:
        for fqn, m in self.model.named_modules():
            if isinstance(m, QLinear) and fqn in state:
                m.qstate.load_quant_state_dict(state[fqn])
