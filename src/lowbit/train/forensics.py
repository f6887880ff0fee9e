"""Divergence forensics: where a diverged run's values first went non-finite.

When the trainer stops a run as diverged (--max-bad-steps), it re-runs forward and backward of the failing step's
last micro-batch (no update; the weights are those the failing step saw, since non-finite steps are skipped)
with a hook on every linear layer and the quantization statistics on, and writes RUN_DIR/divergence.json:

    {"step": 7, "first": {"phase": "forward", "layer": "transformer.h.2.mlp.c_fc", "tensor": "weight", ...},
     "events": [...every linear layer's input, weight, output (forward) and grad_output, grad_input (backward),
                in execution order, with nonfinite_frac and amax...],
     "quant_stats": [...the per-layer, per-GeMM records of lowbit.nn.convert.layer_records, nonfinite included...]}

`first` is the earliest event, in execution order, with a non-finite entry (None when no linear layer saw one:
the NaN arose elsewhere, e.g. in attention's softmax or the loss). The trainer names it in its warning.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from lowbit.nn import collect_stats
from lowbit.nn.convert import layer_records

FILE = "divergence.json"


def _summary(t) -> dict | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    t = t.detach()
    bad = ~torch.isfinite(t)
    finite_abs = torch.where(bad, torch.zeros((), dtype=t.dtype, device=t.device), t).abs()
    return {"nonfinite_frac": float(bad.float().mean()), "amax": float(finite_abs.amax().float()),
            "shape": list(t.shape)}


def _hooks(model: nn.Module, events: list) -> list:
    handles = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue

        def fwd(m, inputs, output, name=fqn):
            for tensor, t in (("input", inputs[0] if inputs else None), ("weight", m.weight), ("output", output)):
                s = _summary(t)
                if s:
                    events.append({"phase": "forward", "layer": name, "tensor": tensor, **s})

        def bwd(m, grad_input, grad_output, name=fqn):
            for tensor, t in (("grad_output", grad_output[0] if grad_output else None),
                              ("grad_input", grad_input[0] if grad_input else None)):
                s = _summary(t)
                if s:
                    events.append({"phase": "backward", "layer": name, "tensor": tensor, **s})

        handles += [mod.register_forward_hook(fwd), mod.register_full_backward_hook(bwd)]
    return handles


def diagnose(model: nn.Module, batch, autocast_ctx, step: int, run_dir: Path | None) -> dict | None:
    """Re-run forward + backward of `batch` (x, y) on the raw `model` under `autocast_ctx` (a context manager),
    record every linear layer's tensors and the quantization statistics, write run_dir/divergence.json (when
    run_dir is given) and return the first non-finite event (or None)."""
    if batch is None:
        return None
    events: list[dict] = []
    handles = _hooks(model, events)
    collect_stats(model, True)
    try:
        x, y = batch
        with autocast_ctx:
            _, loss = model(x, y)
        loss.backward()
    except RuntimeError as e:  # a diagnosis must never hide the divergence itself
        events.append({"phase": "error", "layer": "", "tensor": "", "error": str(e)})
    finally:
        for h in handles:
            h.remove()
        collect_stats(model, False)
        model.zero_grad(set_to_none=True)
    for i, e in enumerate(events):
        e["order"] = i
    first = next((e for e in events if e.get("nonfinite_frac", 0) > 0), None)
    if run_dir is not None:
        doc = {"step": step, "first": first, "events": events, "quant_stats": layer_records(model)}
        Path(run_dir, FILE).write_text(json.dumps(_json(doc), indent=1))
    else:
        layer_records(model)  # drop them
    return first


def describe(first: dict | None) -> str:
    if first is None:
        return "no linear layer saw a non-finite value (it arose elsewhere: attention, a norm or the loss)"
    return (f"first non-finite: {first['layer']} {first['tensor']} in the {first['phase']} pass "
            f"({first['nonfinite_frac']:.2%} of its entries)")


def _json(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json(v) for v in x]
    return x
