"""`lowbit compare` on the command line: the parser (options from lowbit.comparison.command) and the entry
point."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from lowbit import recipes, report
from lowbit.comparison.command import command_line, shared_options
from lowbit.comparison.runner import RESULTS_JSON, SAMPLE_SEED, SAMPLE_TEMPERATURE, SAMPLE_TOP_K, compare
from lowbit.comparison.sweep import parse_sweep
from lowbit.train.config import TrainConfig, option_flag

DEFAULT_RECIPES = "bf16,fp8-tensor,fp4-direct,fp4-paper"


def add_cli(subparsers):
    """Register `lowbit compare` on an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "compare", help="train one model per recipe from identical weights and batches; write a report",
        description="Train the same model from the same initial weights on the same batches once per recipe "
                    "(and per swept value), then write results.json, loss.png and report.md into --out. "
                    "Re-running the same command resumes an interrupted comparison.")
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated recipe names or .toml paths, or 'all' (default: {DEFAULT_RECIPES}; "
                        f"known: {', '.join(recipes.names())})")
    p.add_argument("--out", default="runs/compare", help="comparison directory (default: runs/compare)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="ablation: vary one recipe parameter over values on every quantized recipe, e.g. "
                        "dge.k=1,3,5,10, occ.alpha=0.999,0.99,0.97, occ.compensate=true,false, fmt=e2m1,e1m2,e3m0; "
                        "repeatable (one parameter at a time)")
    p.add_argument("--config", help="TrainConfig TOML file used as the base; other options override it")
    for field, typ, help_ in shared_options():
        p.add_argument(option_flag(field), dest=field, type=typ, default=None, help=help_)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each model")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier comparison in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="run the whole comparison once per seed (into --out/seed<N>/) and report mean ± sd, the "
                        "paired gap to the reference with its 95%% confidence interval and a verdict "
                        "(--out/seeds.md, seeds.json, seeds_loss.png); overrides --seed")
    p.add_argument("--timing-rounds", type=int, default=3, metavar="N",
                   help="rounds of the timing phase after training (every recipe a few steps, interleaved; the "
                        "report's step-time ratios); 0 skips it and reports training's own step times (default: 3)")
    p.add_argument("--eval-tasks", metavar="LIST", default=None,
                   help="after training, zero-shot accuracy of every run on these tasks (as `lowbit eval --tasks`; "
                        "needs the eval extra): a table and paired differences to the reference in the report")
    p.set_defaults(func=run_cli)
    return p


def default_eval_interval(cfg) -> int:
    """About ten validation points per run, so loss.png has curves to compare (a comparison is about the
    curves; `lowbit train`'s fixed default of 100 steps gives a short run only one or two points); runs of
    fewer than 40 steps get about five, never one per step (evaluation would dominate their wall time)."""
    steps = cfg.tokens // (cfg.batch_size * cfg.seq_len * cfg.grad_accum)
    points = 10 if steps >= 40 else 5
    return max(1, min(cfg.eval_interval, -(-steps // points) if steps < 40 else steps // points))


def _config_sets(path: str | None, key: str) -> bool:
    if not path:
        return False
    import tomllib

    try:
        with open(path, "rb") as f:
            return key in tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # TrainConfig.from_toml already reported a bad file


def run_cli(args) -> int:
    """Run `lowbit compare` from parsed args. Returns the exit status: 0, or 1 if any run failed."""
    base = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    overrides = {f: getattr(args, f) for f, _, _ in shared_options() if getattr(args, f, None) is not None}
    if args.compile:
        overrides["compile"] = True
    base = dataclasses.replace(base, **overrides)
    if "eval_interval" not in overrides and not _config_sets(args.config, "eval_interval"):
        base = dataclasses.replace(base, eval_interval=default_eval_interval(base))
    names = recipes.names() if args.recipes.strip() == "all" else [
        r.strip() for r in args.recipes.split(",") if r.strip()]
    sweep = parse_sweep(args.sweep)
    command = command_line(names, base, args.out, sweep, config_path=args.config)
    if args.timing_rounds < 0:
        raise ValueError(f"--timing-rounds must be >= 0, got {args.timing_rounds}")
    eval_tasks = _eval_tasks(args)
    if args.seeds:
        return _run_seeds(args, names, base, sweep)
    results = compare(names, base, args.out, sweep=sweep, progress=not args.no_progress,
                      overwrite=args.overwrite, command=command, timing_rounds=args.timing_rounds)
    out = Path(args.out)
    if eval_tasks:
        from lowbit.downstream import run, table

        zero_shot = table.markdown_section(run.eval_comparison(out, eval_tasks, device=base.device,
                                                               progress=not args.no_progress))
    print(f"wrote {out / RESULTS_JSON}, {out / report.LOSS_PNG}, {out / report.REPORT_MD}")
    print(terminal_table(results) + f"\n(every column: {out / report.REPORT_MD})")
    for label, text in (results.get("samples") or {}).items():
        print(f"\n--- sample from {label} (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K}, seed {SAMPLE_SEED}; "
              f"fp32 master weights) ---\n{text}")
    if eval_tasks:
        print("\n" + "\n".join(zero_shot))
    if results["failed"]:
        print(f"error: {len(results['failed'])} run(s) failed: {', '.join(results['failed'])} "
              f"(tracebacks in {out}/runs/<label>/error.txt)", file=sys.stderr)
        return 1
    return 0


def _eval_tasks(args) -> list[str] | None:
    """--eval-tasks checked before any training: lm-eval present, every task known, no --seeds."""
    if not args.eval_tasks:
        return None
    from lowbit.downstream import run, tasks

    if args.seeds:
        raise ValueError("--eval-tasks evaluates one comparison; with --seeds run `lowbit eval --ckpt OUT/seed<N> "
                         "--tasks LIST` on each seed's directory")
    run.require_lm_eval()
    names = tasks.expand(args.eval_tasks)
    run.task_manager(names)  # an unknown task fails now, not after the training
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct integers, e.g. --seeds 1,2,3")
    return seeds


def _run_seeds(args, names, base, sweep) -> int:
    from lowbit.comparison.seeds import compare_seeds, format_table

    seeds = parse_seeds(args.seeds)

    def one(recipe_list, cfg, out, **kw):
        return compare(recipe_list, cfg, out, command=command_line(recipe_list, cfg, out, sweep, args.config), **kw)

    agg = compare_seeds(names, base, args.out, seeds, one, sweep=sweep, progress=not args.no_progress,
                        overwrite=args.overwrite, timing_rounds=args.timing_rounds)
    out = Path(args.out)
    print(f"wrote {out / 'seeds.json'}, {out / 'seeds.md'}, {out / 'seeds_loss.png'} and one comparison per seed "
          f"in {out}/seed<N>/")
    print(format_table(agg))
    if agg["failed"]:
        print(f"error: run(s) failed: {', '.join(agg['failed'])} (tracebacks in {out}/seed<N>/runs/<label>/error.txt)",
              file=sys.stderr)
        return 1
    return 0


def terminal_table(results: dict) -> str:
    """The comparison in a terminal's width: recipe, validation loss, its gap to the reference, step time and
    matched-loss cost relative to the reference (report.md has every column)."""
    ref = results.get("reference")

    def num(v, fmt, suffix=""):
        return "–" if not isinstance(v, (int, float)) or v != v else format(v, fmt) + suffix

    rows = [("recipe", "val loss", f"Δ vs {ref}", "step time", "matched-loss cost")]
    for label, r in results.get("runs", {}).items():
        cost = num(r.get("matched_loss_cost"), ".2f", "×")
        if cost == "–" and r.get("status") == "ok" and "iso_tokens" in r and r["iso_tokens"] is None:
            cost = "not reached"
        rows.append((label if r.get("status") == "ok" else f"{label} ({r.get('status')})",
                     num(r.get("final_val_loss"), ".4f"), num(r.get("val_gap_pct"), "+.2f", "%"),
                     num(r.get("step_time_rel"), ".2f", "×"), cost))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
