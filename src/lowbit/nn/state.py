"""LayerQuantState: the one mutable per-layer object of a quantized linear layer, and who may change it.

It holds what a recipe needs to remember between calls and what the layer reports:
  * amax histories of delayed scaling (one per quantized operand, newest first; fp32 [history_len]),
  * the call counter that seeds each call's stochastic-rounding stream (SR recipes and Quartet),
  * the Hadamard rotation of the weight-gradient GeMM (fixed, seeded from the layer index),
  * the statistics observer (lowbit.nn.stats.LayerStats) and whether the next calls report to it.

The autograd Function never changes this state: it reads the histories and the rotation, draws from the
generator `begin_call` made for its call (seeded from the layer and the call's index, saved with the call for
its backward), and reports what it observed: the amax of each operand it quantized into `observed_amax` (one
slot per operand) and statistics to the observer. The layer commits the observed amaxes into the histories
after the call (`commit`; the backward's grad_output amax after the next call, or when the state is saved). So a
compiled call that fails before running changes nothing, and the counter, not a generator's hidden position,
is what a checkpoint keeps. It is an nn.Module child of the layer so its tensors follow `.to(device)`; its
buffers are non-persistent (the layer's state_dict stays nn.Linear's) and `quant_state_dict()` /
`load_quant_state_dict()` carry it in the trainer's checkpoints.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.nn.hadamard import random_hadamard
from lowbit.nn.spec import OPERANDS, LinearSpec
from lowbit.nn.stats import LayerStats

SR_SEED = 0x5EED_0001   # stochastic-rounding streams of layer i, call n: seeded from (SR_SEED + i, n)
RHT_SEED = 0x5EED_1000  # Hadamard signs of layer i: RHT_SEED + i
_M64 = (1 << 64) - 1


def call_seed(layer_idx: int, call: int) -> int:
    """The seed of call `call`'s random stream in layer `layer_idx`: SplitMix64's finalizer of
    (SR_SEED + layer) · 2^32 + call, so every bit depends on both (torch's CPU generator keeps only the low 32
    bits of a seed; a plain sum would give every layer the same stream), in [0, 2^63)."""
    z = ((((SR_SEED + layer_idx) << 32) + (call & 0xFFFF_FFFF)) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


class LayerQuantState(nn.Module):
    """Mutable state of one layer under `spec`; `layer_idx` seeds its random streams."""

    def __init__(self, spec: LinearSpec, layer_idx: int, history_len: int, device=None,
                 amax_compute_algo: str = "max", margin: int = 0):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.most_recent, self.headroom = amax_compute_algo == "most_recent", float(2 ** margin)
        self.collect = False
        self.stats = LayerStats()
        self.calls = 0
        self.random = spec.scheme == "quartet" or any(q.rounding == "stochastic" for q in spec.quantizers().values())
        self.call_generator: torch.Generator | None = None
        self.delayed = [op for op in spec.quantizers()] if spec.delayed else []
        for op in self.delayed:
            self.register_buffer(f"amax_history_{op}", torch.zeros(history_len, device=device), persistent=False)
        if self.delayed:  # what the Function observed, NaN where nothing is waiting to be committed
            self.register_buffer("observed_amax", torch.full((len(OPERANDS),), float("nan"), device=device),
                                 persistent=False)
        if spec.hadamard_size:
            R = random_hadamard(spec.hadamard_size, RHT_SEED + self.layer_idx)
            self.register_buffer("hadamard_rotation", R.to(device), persistent=False)

    @property
    def observer(self) -> LayerStats | None:
        """Where the Function reports statistics: the layer's LayerStats while collecting, else None."""
        return self.stats if self.collect else None

    # --- the layer's side: begin a call, commit what it observed ----------------------------------------

    def begin_call(self, device: torch.device) -> None:
        """Before a call: give it its own random stream (recipes that draw: stochastic rounding, Quartet)."""
        if self.random:
            self._next_generator(device)

    @torch.compiler.disable  # the counter is a Python int: traced, it would recompile the graph at every call
    def _next_generator(self, device: torch.device) -> None:
        self.call_generator = torch.Generator(device=device).manual_seed(call_seed(self.layer_idx, self.calls))
        self.calls += 1

    def commit(self) -> None:
        """Push every observed finite amax into its history (newest first) and clear the slots. A non-finite
        amax is not pushed: one inf or NaN in an input must not poison the scale of every later step (as
        Transformer Engine, the last finite history carries on). Branch-free, so it traces under compile."""
        if not self.delayed:
            return
        obs = self.observed_amax
        for op in self.delayed:
            hist, cur = getattr(self, f"amax_history_{op}"), obs[OPERANDS.index(op)]
            hist.copy_(torch.where(torch.isfinite(cur), torch.cat([cur.view(1), hist[:-1]]), hist))
        obs.fill_(float("nan"))

    # --- the Function's side: read, report ----------------------------------------------------------------

    def delayed_amax(self, op: str, t: torch.Tensor, record: bool) -> torch.Tensor:
        """The amax delayed scaling uses for operand `op` (0-d fp32): the history's max, or its newest entry with
        amax_compute_algo "most_recent" (t's own amax while the history is empty), times 2^margin. With
        `record`, t's amax is reported for the layer to commit after the call. Branch-free (traces) but for an
        empty t (an expert no token chose), whose amax is NaN: no observation, so commit leaves the history."""
        hist = getattr(self, f"amax_history_{op}")
        cur = t.abs().amax().float() if t.numel() else torch.full((), float("nan"), device=t.device)
        if record:
            self.observed_amax[OPERANDS.index(op)].copy_(cur)
        hmax = hist[0] if self.most_recent else hist.max()
        return torch.where(hmax > 0, hmax, cur) * self.headroom

    # --- checkpoints ----------------------------------------------------------------------------------------

    def quant_state_dict(self) -> dict:
        """{"calls": n, "buffers": {amax_history_*: tensor}}: what a checkpoint keeps (after a commit)."""
        self.commit()
        return {"calls": self.calls,
                "buffers": {k: b.detach().cpu().clone() for k, b in self.named_buffers(recurse=False)
                            if k.startswith("amax_history_")}}

    def load_quant_state_dict(self, state: dict) -> None:
        if "generators" in state and "calls" not in state:
            logging.getLogger("lowbit.train").warning(
                "this checkpoint predates per-call random streams: stochastic rounding continues from a fresh "
                "stream (the run is not bit for bit the uninterrupted one)")
        self.calls = int(state.get("calls", 0))
        for k, b in state.get("buffers", {}).items():
            getattr(self, k).copy_(b)
        if self.delayed:
            self.observed_amax.fill_(float("nan"))
