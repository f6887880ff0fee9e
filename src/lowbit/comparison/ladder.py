"""`lowbit ladder`: one `lowbit compare` per (model shape, tokens-per-parameter D/N, seed) cell, the gap of every
recipe to bf16 against D/N, beside the published reference tables (lowbit.comparison.references).

    cells = plan_ladder(["llama-nano", "llama-micro"], [25, 100], seeds=[1, 2, 3], seeds_at=[25],
                        tokens_per_step=4096)
    run_ladder(["bf16", "nvfp4"], cells, base, out="runs/ladder", keep="bench/ladder")

Parameter counts: N is counted as the reference tables count it (QuEST and Quartet II: every parameter except the
token embedding and the output head; a GPT's learned position embedding stays in) -- `count="reference"`, the
default -- or `count="total"`; every cell records D/N under both counts.

Layout: `out/<model>/dn<D/N>/seed<S>/` is one comparison (resumable as compare is); `keep/<same>/<label>.result.json`
holds each finished run's result.json, restored into `out` before a cell runs, so a ladder resumes (and its report
is rebuilt) from `keep` alone. `out/ladder.json`, `ladder.md`, `ladder.png`: the aggregate (ladder_report).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from lowbit.comparison.seeds import t_interval

log = logging.getLogger("lowbit")
MAX_PASSES = 4.0  # a ladder point trained on more than 4 passes over its data measures memorisation
COUNTS = ("reference", "total")


def param_counts(model: str, vocab_size: int) -> dict[str, int]:
    """{"total", "reference"} parameter counts of preset `model` at `vocab_size`. reference = total minus the
    token embedding and the output head (one matrix when they are tied); for a mixture of experts both count the
    *active* parameters (the chosen experts only): D/N by what a token uses."""
    from lowbit.flops import count_params
    from lowbit.models import get_config

    cfg = get_config(model, vocab_size=vocab_size)
    counts = count_params(cfg)
    total = counts.get("active", counts["total"])
    vd = cfg.vocab_size * cfg.n_embd
    return {"total": total, "reference": total - vd * (1 if cfg.tie_embeddings else 2)}


@dataclass(frozen=True)
class Cell:
    """One comparison of the ladder. tokens: the planned D, a whole number of optimizer steps."""
    model: str
    dn: float
    seed: int
    tokens: int
    n_reference: int
    n_total: int

    @property
    def key(self) -> str:
        return f"{self.model}/dn{self.dn:g}/seed{self.seed}"

    def d_over_n(self) -> dict[str, float]:
        return {"reference": self.tokens / self.n_reference, "total": self.tokens / self.n_total}


def plan_ladder(models: list[str], dns: list[float], seeds: list[int], *, tokens_per_step: int,
                vocab_size: int = 2048, seeds_at: list[float] | None = None, count: str = "reference") -> list[Cell]:
    """The cells, in run order: D/N ascending, then seed, then model. Every seed runs at the D/N values in
    `seeds_at` (None: at all); elsewhere only the first seed. D = D/N x N(count), rounded to whole steps."""
    if count not in COUNTS:
        raise ValueError(f"--count {count!r}: use one of {', '.join(COUNTS)}")
    if not models or not dns or not seeds:
        raise ValueError("a ladder needs at least one model (--models), one D/N (--dn) and one seed (--seeds)")
    if any(not dn > 0 for dn in dns):
        raise ValueError(f"--dn {dns}: tokens per parameter must be positive numbers, e.g. --dn 25,100")
    cells = []
    for dn in sorted(set(dns)):
        for seed in (seeds if seeds_at is None or dn in seeds_at else seeds[:1]):
            for model in models:
                n = param_counts(model, vocab_size)
                steps = max(1, round(dn * n[count] / tokens_per_step))
                cells.append(Cell(model, float(dn), seed, steps * tokens_per_step, n["reference"], n["total"]))
    return cells


def check_passes(cells: list[Cell], train_tokens: int, limit: float = MAX_PASSES) -> list[str]:
    """Refuse a cell that would see the training split more than `limit` times; return warnings for > 1 pass."""
    warnings = []
    for c in cells:
        passes = c.tokens / train_tokens
        if passes > limit:
            raise ValueError(
                f"ladder cell {c.key} needs {c.tokens:,} training tokens = {passes:.1f} passes over the "
                f"{train_tokens:,}-token training split (at most {limit:g} allowed: beyond that the loss measures "
                f"memorisation). Fix: lower --dn, use a smaller --models shape, or a larger corpus (e.g. --data "
                f"debian-docs+shakespeare, or your own with --data PATH)")
        if passes > 1:
            warnings.append(f"ladder cell {c.key}: {passes:.2f} passes over the training split (repeated data)")
    return warnings


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard `index` of `count` (0-based): greedy by planned tokens, so parallel processes finish
    together; each shard keeps the run order."""
    if not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: give K/N with 0 <= K < N, e.g. --shard 0/2")
    load, owner = [0] * count, {}
    for i in sorted(range(len(cells)), key=lambda i: -cells[i].tokens):
        k = min(range(count), key=lambda s: load[s])
        owner[i], load[k] = k, load[k] + cells[i].tokens
    return [c for i, c in enumerate(cells) if owner[i] == index]


def restore(keep: Path, cell: Cell, cell_dir: Path) -> int:
    """Copy kept result.json summaries of `cell` into its comparison's run directories; returns how many."""
    n = 0
    for src in sorted((keep / cell.key).glob("*.result.json")):
        dst = cell_dir / "runs" / src.name[: -len(".result.json")] / "result.json"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            n += 1
    return n


def save(keep: Path, cell: Cell, cell_dir: Path) -> int:
    """Keep every finished run's result.json of a cell's comparison (the trainer writes result.json only when a
    run has finished, diverged runs included); returns how many were new."""
    n = 0
    for src in sorted((cell_dir / "runs").glob("*/result.json")):
        dst = keep / cell.key / f"{src.parent.name}.result.json"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            n += 1
    return n


def run_ladder(recipe_names: list[str], cells: list[Cell], base, out, keep=None, *, progress: bool = True,
               compare_fn=None, eval_points: bool = True) -> dict:
    """Run (or resume) every cell's comparison, keep its summaries, and return the aggregate of `cells` (see
    `aggregate`). `base`: the TrainConfig shared by all cells (model, tokens and seed are set per cell);
    eval_points: give each cell compare's default evaluation interval (about ten points per run)."""
    from lowbit.comparison.cli import default_eval_interval
    from lowbit.comparison.runner import compare

    compare_fn = compare_fn or compare
    out = Path(out)
    keep = Path(keep) if keep else None
    for i, cell in enumerate(cells, 1):
        cell_dir = out / cell.key
        if keep is not None:
            restore(keep, cell, cell_dir)
        log.info("[ladder] cell %d/%d: %s (%s tokens)", i, len(cells), cell.key, f"{cell.tokens:,}")
        cfg = dataclasses.replace(base, model=cell.model, tokens=cell.tokens, seed=cell.seed)
        if eval_points:
            cfg = dataclasses.replace(cfg, eval_interval=default_eval_interval(cfg))
        try:
            compare_fn(recipe_names, cfg, cell_dir, progress=progress, timing_rounds=0)
        finally:  # also when stopped mid-cell: the runs that finished are kept
            if keep is not None:
                save(keep, cell, cell_dir)
    return aggregate(cells, out, keep)


def found_cells(out, keep, **plan) -> list[Cell]:
    """The cells with finished runs in `out` or `keep`, in run order, each with the tokens its runs trained (read
    from a result.json): what `--report-only` reports, whatever --models/--dn/--seeds say. `plan`: plan_ladder's
    keyword arguments (tokens_per_step, vocab_size, count)."""
    keys = set()
    for root, pattern in ((keep, "*/dn*/seed*/*.result.json"), (out, "*/dn*/seed*/runs/*/result.json")):
        if root is not None and Path(root).is_dir():
            keys |= {(p.relative_to(root).parts[:3], p) for p in Path(root).glob(pattern)}
    by_cell: dict[tuple, Path] = {}
    for (model, dn, seed), path in sorted(keys):
        by_cell.setdefault((model, float(dn[2:]), int(seed[4:])), path)
    cells = []
    for (model, dn, seed), path in sorted(by_cell.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        cell = plan_ladder([model], [dn], [seed], **plan)[0]
        tokens = json.loads(path.read_text()).get("tokens")
        cells.append(dataclasses.replace(cell, tokens=tokens) if isinstance(tokens, int) and tokens > 0 else cell)
    return cells


def _cell_losses(cell: Cell, out: Path, keep: Path | None) -> dict[str, dict]:
    """{label: result dict} of the finished runs of `cell`, from `out` or else from `keep`."""
    found = {}
    if keep is not None:
        for p in sorted((keep / cell.key).glob("*.result.json")):
            found[p.name[: -len(".result.json")]] = json.loads(p.read_text())
    for p in sorted((out / cell.key / "runs").glob("*/result.json")):
        found[p.parent.name] = json.loads(p.read_text())
    return found


def aggregate(cells: list[Cell], out, keep=None, reference: str = "bf16") -> dict:
    """{"cells": per-cell losses, "rows": one row per (model, D/N, recipe)} with the gap to `reference` in % of
    its loss, per seed (paired: same seed = same weights and batches), its mean and 95% t interval."""
    out, keep = Path(out), Path(keep) if keep else None
    groups: dict[tuple, list[tuple[Cell, dict]]] = {}
    cell_rows = []
    for c in cells:
        res = _cell_losses(c, out, keep)
        losses = {lab: r.get("final_val_loss") for lab, r in res.items() if r.get("diverged_at_step") is None}
        groups.setdefault((c.model, c.dn), []).append((c, losses))
        cell_rows.append({"key": c.key, "model": c.model, "dn": c.dn, "seed": c.seed, "tokens": c.tokens,
                          "d_over_n": c.d_over_n(), "val_loss": losses,
                          "diverged": sorted(lab for lab, r in res.items() if r.get("diverged_at_step") is not None)})
    rows = []
    for (model, dn), members in groups.items():
        labels = list(dict.fromkeys(lab for _, ls in members for lab in ls))
        c0 = members[0][0]
        for lab in labels:
            pairs = [(ls[lab], ls[reference]) for _, ls in members
                     if _num(ls.get(lab)) and _num(ls.get(reference))]
            gaps = [100 * (v / r - 1) for v, r in pairs]
            ci = t_interval(gaps) if lab != reference else None
            rows.append({"model": model, "dn": dn, "recipe": lab, "n_reference": c0.n_reference, "n_total": c0.n_total,
                         "tokens": c0.tokens, "d_over_n": c0.d_over_n(), "seeds": len(pairs),
                         "val_loss_mean": statistics.fmean(v for v, _ in pairs) if pairs else None,
                         "gap_pct": statistics.fmean(gaps) if gaps else None,
                         "gap_pct_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
                         "gap_pct_ci95": list(ci) if ci else None})
    return {"reference": reference, "cells": cell_rows, "rows": rows,
            "complete": all(r["val_loss"] for r in cell_rows)}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
