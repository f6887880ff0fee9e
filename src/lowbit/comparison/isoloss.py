"""Iso-loss cost: what a recipe pays to reach the reference's final validation loss (pure functions).

A raw step-time ratio hides that a recipe may need more tokens for the same loss (nanochat measured FP8 at +17%
tokens/s, but about 5% once the loss is matched). For each run:

    iso_tokens          the tokens at which its validation curve first reaches the target, the reference's final
                        validation loss × (1 + ISO_TOLERANCE), linearly interpolated between evaluation points;
                        None ("not reached") if it never does. The tolerance (0.1%) keeps a run that ends a hair
                        above the reference (fp8-tensor at +0.004%) from reading "not reached"; the reference's
                        own iso_tokens use the same target, so ratios compare like with like
    iso_token_ratio     iso_tokens / the reference's own iso_tokens
    matched_loss_cost   step_time_rel × iso_token_ratio: the compute, relative to the reference, for the same loss
"""
from __future__ import annotations

import math

ISO_TOLERANCE = 1e-3  # relative: a run within 0.1% of the reference's final validation loss has reached it


def val_curve(history: list[dict]) -> list[tuple[float, float]]:
    """(tokens, val_loss) of the rows that have a finite validation loss, in order."""
    out = []
    for row in history or []:
        v, t = row.get("val_loss"), row.get("tokens")
        if isinstance(v, (int, float)) and math.isfinite(v) and isinstance(t, (int, float)):
            out.append((float(t), float(v)))
    return out


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first token count at which the curve is at or below `target`: between two evaluations the loss is
    taken as linear in tokens; the first point itself if it is already there; None if no point reaches it."""
    if not math.isfinite(target):
        return None
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return t
            t0, v0 = prev
            return t0 + (v0 - target) * (t - t0) / (v0 - v)
        prev = (t, v)
    return None


def iso_loss(runs: dict[str, dict], reference: str | None, tolerance: float = ISO_TOLERANCE) -> dict[str, dict]:
    """{label: {"iso_tokens", "iso_token_ratio", "matched_loss_cost"}} for every run (None where undefined:
    no reference, the run failed, or the target, the reference's final loss × (1 + tolerance), is not reached)."""
    empty = {"iso_tokens": None, "iso_token_ratio": None, "matched_loss_cost": None}
    ref = runs.get(reference) if reference is not None else None
    target = ref.get("final_val_loss") if ref and ref.get("status") == "ok" else None
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        return {label: dict(empty) for label in runs}
    target = target * (1 + tolerance) if target > 0 else target * (1 - tolerance)
    ref_tokens = tokens_to_reach(val_curve(ref.get("history")), target)
    out = {}
    for label, r in runs.items():
        g = dict(empty)
        if r.get("status") == "ok":
            g["iso_tokens"] = tokens_to_reach(val_curve(r.get("history")), target)
        if g["iso_tokens"] is not None and ref_tokens:
            g["iso_token_ratio"] = g["iso_tokens"] / ref_tokens
            step = r.get("step_time_rel")
            if isinstance(step, (int, float)) and math.isfinite(step):
                g["matched_loss_cost"] = step * g["iso_token_ratio"]
        out[label] = g
    return out
