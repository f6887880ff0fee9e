"""LayerQuantState: the one mutable per-layer object of a quantized linear layer, and who may change it.

It holds what a recipe needs to remember between calls and what the layer reports:
  * amax histories of delayed scaling (one per quantized operand, newest first; fp32 [history_len]),
  * the call counter that seeds each call's stochastic-rounding stream (SR recipes and Quartet),
  * the Hadamard rotation of the weight-gradient GeMM (fixed, seeded from the layer index),
  * the statistics observer (lowbit.nn.stats.LayerStats) and whether the next calls report to it.

The autograd Function never changes this state: it reads the histories and the rotation, draws from the
random streams of the call index `begin_call` took (lowbit.rng.Stream: the layer and that index; the forward and
the backward draw from two parts of it), and reports what it observed: the amax of each operand it quantized
into `observed_amax` (one slot per operand) and statistics to the observer. The layer commits the observed amaxes into the histories
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

from lowbit.kernels.reduce import tensor_amax
from lowbit.nn.hadamard import hadamard_signs, normalized_hadamard
from lowbit.nn.spec import OPERANDS, LinearSpec
from lowbit.nn.stats import LayerStats
from lowbit.rng import BACKWARD_FIRST, Stream, call_seed, call_seed_t  # noqa: F401 (call_seed*: re-exported)

RHT_SEED = 0x5EED_1000  # Hadamard signs of layer i: RHT_SEED + i


class LayerQuantState(nn.Module):
    """Mutable state of one layer under `spec`; `layer_idx` seeds its random streams."""

    def __init__(self, spec: LinearSpec, layer_idx: int, history_len: int, device=None,
                 amax_compute_algo: str = "max", margin: int = 0):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.most_recent, self.headroom = amax_compute_algo == "most_recent", float(2 ** margin)
        self.collect = False
        self.stats = LayerStats()
        self.random = spec.scheme == "quartet" or any(q.rounding == "stochastic" for q in spec.quantizers().values())
        self.call_index: torch.Tensor | None = None  # this call's index (its random stream's), 0-d int64
        # calls so far (seeds each call's stream): a buffer, so compiled steps count inside the graph
        self.register_buffer("sr_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.delayed = [op for op in spec.quantizers()] if spec.delayed else []
        for op in self.delayed:
            self.register_buffer(f"amax_history_{op}", torch.zeros(history_len, device=device), persistent=False)
        if self.delayed:  # what the Function observed, NaN where nothing is waiting to be committed
            self.register_buffer("observed_amax", torch.full((len(OPERANDS),), float("nan"), device=device),
                                 persistent=False)
        if spec.hadamard_size:  # the RHT's R = diag(s)·H/√n: signs s fp32 [n] and H/√n fp32 [n, n]
            n = spec.hadamard_size
            self.register_buffer("hadamard_signs", hadamard_signs(n, RHT_SEED + self.layer_idx).to(device),
                                 persistent=False)
            self.register_buffer("hadamard_rotation", normalized_hadamard(n).to(device), persistent=False)
        if spec.rotation_size:  # Quartet's H/√n, fp32 [n, n]: a buffer, so a compiled step does not rebuild it
            self.register_buffer("quartet_rotation", normalized_hadamard(spec.rotation_size).to(device),
                                 persistent=False)

    @property
    def observer(self) -> LayerStats | None:
        """Where the Function reports statistics: the layer's LayerStats while collecting, else None."""
        return self.stats if self.collect else None

    # --- the layer's side: begin a call, commit what it observed ----------------------------------------

    @property
    def calls(self) -> int:
        """Calls that drew random numbers so far (what a checkpoint keeps)."""
        return int(self.sr_calls)

    @calls.setter
    def calls(self, n: int) -> None:
        self.sr_calls.fill_(int(n))

    def begin_call(self, device: torch.device) -> None:
        """Before a call: give it its own random stream (recipes that draw: stochastic rounding, Quartet), seeded
        from the layer and the call counter by tensor ops (no torch.Generator, no host sync, traceable)."""
        if self.random:
            self.call_index = self.sr_calls.clone()
            self.sr_calls.add_(1)

    def streams(self, call: torch.Tensor | None) -> tuple[Stream | None, Stream | None]:
        """(forward, backward) random streams of the call whose index begin_call set (None, None: draws nothing)."""
        if call is None:
            return None, None
        return Stream(layer=self.layer_idx, call=call), Stream(first=BACKWARD_FIRST, layer=self.layer_idx, call=call)

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
        cur = tensor_amax(t) if t.numel() else torch.full((), float("nan"), device=t.device)
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
