"""Per-layer, per-GeMM quantization statistics: what one quantization of one operand lost.

The three GeMMs and the operands each quantizes (lowbit.nn.spec's layout):
    fprop  Y = X·Wᵀ      input, weight
    dgrad  dX = dY·W     grad_output, weight
    wgrad  dW = dYᵀ·X    grad_output, input
A statistic is recorded for a GeMM's operand when that GeMM quantizes it (an operand reused from another GeMM,
e.g. per-tensor W in dgrad, is recorded once, under the GeMM that quantized it).

For t (the operand as the GeMM receives it, in the compute dtype) and tq = Q(t):
    nonfinite   fraction of t's entries that are inf or NaN; amax: the largest |t| (inf/NaN if t holds any)
    underflow   fraction of t's nonzero entries that became 0
    saturated   fraction of entries clipped: |t / scale| > the format's max, beyond rounding (absmax scaling
                clips none; delayed scaling, amax margins and QuEST's clip do)
    rel_err     ‖tq − t‖ / ‖t‖ (0 for an all-zero t), and sqnr_db = −20·log10(rel_err)
    (element-wise ones from every k-th row of operands above 64k entries: see record_operand)
    scale_log2_min / _mean / _max   over the operand's scales (log2 of the decode scale)
For OCC (fprop's input): occ_clamped (fraction of entries clamped) and occ_residual_share (‖ΔX·Wᵀ‖ / ‖Y‖).

One pipeline: the Function reports each quantization to its layer's LayerStats (one per layer), which keeps
one record per (GeMM, operand): the mean of each statistic over the calls since it was last popped. Everything
else is derived from those records: quant_stats.jsonl (lowbit.train.qstats) and the model-wide means the
metrics log (`model_means`).
"""
from __future__ import annotations

import math

import torch

from lowbit import kernels
from lowbit.formats import get_format
from lowbit.nn.spec import scaled_and_scales_2d
from lowbit.quant import divide_by_scales
from lowbit.tensor_quant import TensorQuant

GEMMS = ("fprop", "dgrad", "wgrad")
STATS = ("nonfinite", "amax", "underflow", "saturated", "rel_err", "sqnr_db", "scale_log2_min", "scale_log2_mean",
         "scale_log2_max")


def operand_stats(t: torch.Tensor, tq: torch.Tensor, q: TensorQuant, scaled: torch.Tensor,
                  scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-d fp32 tensors (no host sync) of one quantization: t, tq [R, C] (any float dtype); scaled = t / scale
    (fp32, t's shape; overwritten); scales: the decode scales (any shape). Few passes: it runs on every operand
    of every layer at each sampled step."""
    n = max(t.numel(), 1)
    t, tq = t.float(), tq.float()  # comparisons of bf16 tensors are several times slower than of fp32 ones
    n_nz = torch.count_nonzero(t).clamp_min(1).float()
    norm = torch.linalg.vector_norm(t)
    under = torch.count_nonzero((t != 0) & (tq == 0)).float() / n_nz
    err = torch.linalg.vector_norm(tq.sub_(t))
    err = err / torch.where(norm > 0, norm, torch.ones_like(norm))
    # beyond max by more than the rounding of x / s (the group's absmax itself lands within 2^-22 of max)
    sat = torch.count_nonzero(scaled.abs_() > get_format(q.fmt).max * (1 + 2 ** -20)).float() / n
    return {"nonfinite": torch.count_nonzero(torch.isnan(t * 0)).float() / n,  # inf·0 and NaN·0 are NaN
            "amax": torch.maximum(t.amax(), -t.amin()).float() if t.numel() else torch.zeros(()),
            "underflow": under,
            "saturated": sat, "rel_err": err, "sqnr_db": -20 * torch.log10(err.clamp_min(1e-30)),
            **scale_stats(scales)}


def scale_stats(scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """min / mean / max of log2 of the finite decode scales (NaN when none is finite), 0-d fp32 tensors."""
    ls = torch.log2(scales.float().flatten())
    ls = ls[torch.isfinite(ls)]
    if ls.numel() == 0:
        ls = torch.full((1,), math.nan, device=scales.device)
    return {"scale_log2_min": ls.min(), "scale_log2_mean": ls.mean(), "scale_log2_max": ls.max()}


# the model-wide metrics: (metric, gemm, operand, statistic), from the GeMM that quantizes the operand first
MEANS = (("underflow_frac_input", "fprop", "input", "underflow"),
         ("underflow_frac_weight", "fprop", "weight", "underflow"),
         ("underflow_frac_grad_output", "dgrad", "grad_output", "underflow"),
         ("occ_clamped_frac", "fprop", "input", "occ_clamped"))


class LayerStats:
    """One layer's statistics sink: sums and counts of 0-d tensors per (gemm, operand, statistic), kept on the
    device (no host sync until `pop`)."""

    def __init__(self):
        self._sums: dict[tuple[str, str, str], list] = {}

    def record(self, gemm: str, op: str, values: dict[str, torch.Tensor]) -> None:
        """Add one quantization's (or one OCC call's) statistics under (gemm, op)."""
        for name, v in values.items():
            s = self._sums.get((gemm, op, name))
            if s is None:
                self._sums[(gemm, op, name)] = [v.detach().float(), 1]
            else:
                s[0] = s[0] + v.detach().float()
                s[1] += 1

    def pop(self) -> dict[tuple[str, str], dict[str, float]]:
        """{(gemm, operand): {statistic: mean since the last pop}}, then empty."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for (gemm, op, name), (total, count) in self._sums.items():
            out.setdefault((gemm, op), {})[name] = float(total) / count
        self._sums = {}
        return out


def model_means(records: list[dict]) -> dict[str, float]:
    """The metrics' model-wide means from per-layer records ({"layer", "gemm", "operand", statistic: value}):
    each MEANS metric is the mean over layers of its record's statistic (grad_output from wgrad where no dgrad
    quantized it), underflow_frac the mean of the three underflow ones. Metrics with no data are absent."""
    by = {(r["layer"], r["gemm"], r["operand"]): r for r in records}
    layers = list(dict.fromkeys(r["layer"] for r in records))
    out = {}
    for metric, gemm, op, stat in MEANS:
        vals = []
        for layer in layers:
            rec = by.get((layer, gemm, op)) or (by.get((layer, "wgrad", op)) if gemm == "dgrad" else None)
            if rec is not None and stat in rec:
                vals.append(rec[stat])
        if vals:
            out[metric] = sum(vals) / len(vals)
    under = [v for k, v in out.items() if k.startswith("underflow_frac_")]
    if under:
        out["underflow_frac"] = sum(under) / len(under)
    return out


SAMPLE_ELEMS = 1 << 16  # element-wise statistics of a larger operand come from an even spread of its rows


def record_operand(observer: LayerStats, gemm: str, op: str, t: torch.Tensor, tq: torch.Tensor, q: TensorQuant,
                   amax=None, scales: torch.Tensor | None = None) -> None:
    """Report one quantization's statistics to `observer` (a layer's LayerStats). `scales`: the
    decode scales the quantizer used (absmax_scale's shape for t), which makes the scale statistics free and
    exact; without them they are recomputed. An operand above SAMPLE_ELEMS entries is summarised from every
    k-th row (at least SAMPLE_ELEMS entries) for its element-wise statistics, which keeps a sampled step's
    extra cost small."""
    k = max(1, t.numel() // SAMPLE_ELEMS) if t.dim() == 2 else 1
    if scales is not None and q.granularity != "block":  # scales per row (or one): sample rows and their scales
        fused = kernels.operand_stats(t, tq, q, get_format(q.fmt).max, scales, k)  # one pass on CPU
        if fused is not None:
            observer.record(gemm, op, {**fused, **scale_stats(scales)})
            return
        ts, tqs = (t[::k], tq[::k]) if k > 1 else (t, tq)
        ss = scales if q.granularity == "tensor" or k == 1 else scales[::k]
        observer.record(gemm, op, operand_stats(ts, tqs, q, divide_by_scales(ts, q, ss), scales))
        return
    scaled, scales = scaled_and_scales_2d(t, q, amax)  # padded or 2-D blocks: recompute (weights, rare shapes)
    if k > 1:
        t, tq, scaled = t[::k], tq[::k], scaled[::k]
    observer.record(gemm, op, operand_stats(t, tq, q, scaled, scales))
