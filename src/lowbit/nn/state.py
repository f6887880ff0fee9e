"""LayerQuantState: the one mutable per-layer object of a quantized linear layer.

It holds what a recipe needs to remember between calls and what the layer reports:
  * amax histories of delayed scaling (one per quantized operand, newest first; fp32 [history_len]),
  * the stochastic-rounding generator (one per device, seeded from the layer index),
  * the Hadamard rotation of the weight-gradient GeMM (fixed, seeded from the layer index),
  * statistics (sums and counts, when `collect` is on).
The autograd Function is given this object and writes nothing else. It is an nn.Module child of the
layer so its tensors follow `.to(device)`; its buffers are non-persistent (the layer's state_dict stays
nn.Linear's) and `quant_state_dict()` / `load_quant_state_dict()` carry it in the trainer's checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.hadamard import random_hadamard
from lowbit.nn.spec import LinearSpec

SR_SEED = 0x5EED_0001   # stochastic-rounding stream of layer i: SR_SEED + i
RHT_SEED = 0x5EED_1000  # Hadamard signs of layer i: RHT_SEED + i


class LayerQuantState(nn.Module):
    """Mutable state of one layer under `spec`; `layer_idx` seeds its random streams."""

    def __init__(self, spec: LinearSpec, layer_idx: int, history_len: int, device=None,
                 amax_compute_algo: str = "max", margin: int = 0):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.most_recent, self.headroom = amax_compute_algo == "most_recent", float(2 ** margin)
        self.collect = False
        self.stats: dict[str, list] = {}
        self.generators: dict[str, torch.Generator] = {}
        if spec.delayed:
            for op in spec.quantizers():
                self.register_buffer(f"amax_history_{op}", torch.zeros(history_len, device=device),
                                     persistent=False)
        if spec.hadamard_size:
            R = random_hadamard(spec.hadamard_size, RHT_SEED + self.layer_idx)
            self.register_buffer("hadamard_rotation", R.to(device), persistent=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """The layer's stochastic-rounding generator on `device` (created on first use)."""
        key = str(device)
        g = self.generators.get(key)
        if g is None:
            g = torch.Generator(device=device).manual_seed(SR_SEED + self.layer_idx)
            self.generators[key] = g
        return g

    def delayed_amax(self, op: str, t: torch.Tensor, record: bool) -> torch.Tensor:
        """The amax delayed scaling uses for operand `op`: the history's max, or its newest entry with
        amax_compute_algo "most_recent" (t's own amax while the history is empty), times 2^margin; with
        `record`, t's amax is pushed into the history -- only when it is finite: one inf or NaN in an input must
        not poison the scale of every later step (as Transformer Engine, the last finite history carries on).
        0-d fp32. Branch-free (torch.where), so it traces under torch.compile."""
        hist = getattr(self, f"amax_history_{op}")
        cur = t.abs().amax().float()
        hmax = hist[0] if self.most_recent else hist.max()
        amax = torch.where(hmax > 0, hmax, cur) * self.headroom
        if record:
            pushed = torch.cat([cur.view(1).to(hist.dtype), hist[:-1]])
            hist.copy_(torch.where(torch.isfinite(cur), pushed, hist))
        return amax

    def add_stat(self, key: str, value: torch.Tensor) -> None:
        """Accumulate one observation (0-d tensor) of statistic `key`."""
        s = self.stats.get(key)
        if s is None:
            self.stats[key] = [value.detach().float(), 1]
        else:
            s[0] = s[0] + value.detach().float()
            s[1] += 1

    def pop_stats(self) -> dict[str, float]:
        """Mean of each statistic since the last call, then reset (per-layer records: pop_layer_stats)."""
        out = {k: float(total) / count for k, (total, count) in self.stats.items() if not isinstance(k, tuple)}
        self.stats = {k: v for k, v in self.stats.items() if isinstance(k, tuple)}
        return out

    def add_layer_stats(self, gemm: str, op: str, values: dict[str, torch.Tensor]) -> None:
        """Accumulate one quantization's statistics (lowbit.nn.stats) under (gemm, operand)."""
        for name, v in values.items():
            self.add_stat((gemm, op, name), v)

    def pop_layer_stats(self) -> dict[tuple[str, str], dict[str, float]]:
        """{(gemm, operand): {statistic: mean since the last call}}, then reset those."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for key, (total, count) in self.stats.items():
            if isinstance(key, tuple):
                out.setdefault(key[:2], {})[key[2]] = float(total) / count
        self.stats = {k: v for k, v in self.stats.items() if not isinstance(k, tuple)}
        return out

    def quant_state_dict(self) -> dict:
        """{"generators": {device: state}, "buffers": {amax_history_*: tensor}}: what a checkpoint keeps."""
        return {"generators": {k: g.get_state() for k, g in self.generators.items()},
                "buffers": {k: b.detach().cpu().clone() for k, b in self.named_buffers(recurse=False)
                            if k.startswith("amax_history_")}}

    def load_quant_state_dict(self, state: dict) -> None:
        for k, g_state in state.get("generators", {}).items():
            self.generator(torch.device(k)).set_state(g_state)
        for k, b in state.get("buffers", {}).items():
            getattr(self, k).copy_(b)
