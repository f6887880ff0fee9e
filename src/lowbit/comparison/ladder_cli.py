"""`lowbit ladder` on the command line (see lowbit.comparison.ladder)."""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

DEFAULT_RECIPES = "bf16,fp8-tensor,fp4-direct,fp4-paper,nvfp4,quartet"
DEFAULT_MODELS = "llama-nano,llama-micro"


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 25,100") from None


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: give K/N, e.g. --shard 0/2 and --shard 1/2 in two processes") from None
    return k, n


def add_cli(subparsers):
    from lowbit.comparison.command import shared_options
    from lowbit.train.config import option_flag

    p = subparsers.add_parser(
        "ladder", help="run lowbit compare over model sizes x tokens-per-parameter; gap to bf16 vs D/N",
        description="For every model shape, D/N value and seed, run one `lowbit compare` (same recipes, same "
                    "seeds) with D = D/N x N training tokens; write ladder.json, ladder.md (table, verdicts against "
                    "the published FP4 results, scaling fit) and ladder.png into --out. Re-running resumes.")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated recipes (default: {DEFAULT_RECIPES})")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model presets (default: {DEFAULT_MODELS})")
    p.add_argument("--dn", default="25,100", help="tokens per parameter, comma-separated (default: 25,100)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default: 1)")
    p.add_argument("--seeds-at", help="D/N values that get every seed; the others only the first (default: all)")
    p.add_argument("--count", default="reference", choices=["reference", "total"],
                   help="parameter count for D/N: reference = all but the token embedding and the output head "
                        "(QuEST, Quartet II), total = every parameter (default: reference)")
    p.add_argument("--out", default="runs/ladder", help="ladder directory (default: runs/ladder)")
    p.add_argument("--keep", help="directory that keeps every finished run's result.json (e.g. bench/ladder); "
                                  "the ladder resumes from it")
    p.add_argument("--shard", metavar="K/N", help="run only shard K of N of the cells (parallel processes); "
                                                  "the report covers every cell found")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild ladder.json/md/png from the runs in --out and --keep (no data needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for field, typ, help_ in shared_options():
        if field not in ("model", "tokens", "seed"):
            p.add_argument(option_flag(field), dest=field, type=typ, default=None, help=help_)
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from lowbit.comparison.cli import parse_seeds
    from lowbit.comparison.command import shared_options
    from lowbit.comparison.ladder import (aggregate, check_passes, found_cells, log, plan_ladder, run_ladder,
                                          shard)
    from lowbit.comparison.ladder_report import write_report
    from lowbit.data import prepare_dataset
    from lowbit.train import TrainConfig

    overrides = {f: getattr(args, f) for f, _, _ in shared_options() if getattr(args, f, None) is not None}
    base = dataclasses.replace(TrainConfig(), **overrides)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    recipe_names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if "bf16" not in recipe_names:
        raise ValueError("--recipes must include bf16: the ladder reports every gap against it")
    seeds_at = _floats(args.seeds_at, "--seeds-at") if args.seeds_at else None
    shard_of = _shard(args.shard)
    plan = dict(seeds_at=seeds_at, tokens_per_step=base.batch_size * base.seq_len * base.grad_accum,
                count=args.count)
    dns, seeds = _floats(args.dn, "--dn"), parse_seeds(args.seeds)
    train_tokens = None
    if args.report_only:  # what the kept summaries hold, never the flags' defaults; nothing is tokenized
        cells = found_cells(args.out, args.keep, vocab_size=base.vocab_size, tokens_per_step=plan["tokens_per_step"],
                            count=args.count)
        if not cells:
            raise ValueError(f"--report-only: no finished ladder runs under --out {args.out}"
                             + (f" or --keep {args.keep}" if args.keep else "") + "; nothing to report")
        models = list(dict.fromkeys(c.model for c in cells))
        log.info("report from the kept runs: %d cells, models %s, D/N %s, seeds %s", len(cells), ", ".join(models),
                 ", ".join(f"{d:g}" for d in sorted({c.dn for c in cells})), sorted({c.seed for c in cells}))
    else:
        ds = prepare_dataset(base.data, tokenizer=base.tokenizer, vocab_size=base.vocab_size,
                             val_fraction=base.val_fraction)
        cells = plan_ladder(models, dns, seeds, vocab_size=ds.tokenizer.vocab_size, **plan)
        train_tokens = len(ds.train)
        for w in check_passes(cells, train_tokens):
            log.warning("%s", w)
        del ds
        mine = shard(cells, *shard_of) if shard_of else cells
        run_ladder(recipe_names, mine, base, args.out, args.keep, progress=not args.no_progress)
    agg = aggregate(cells, args.out, args.keep)
    meta = {"command": " ".join(shlex.quote(a) for a in ["lowbit", *sys.argv[1:]]), "count": args.count,
            "recipes": recipe_names, "models": models, "train_tokens": train_tokens, "data": base.data}
    report = write_report(agg, args.out, meta)
    out = Path(args.out)
    print(f"wrote {out / 'ladder.json'}, {out / 'ladder.md'}, {out / 'ladder.png'}")
    print((out / "ladder.md").read_text())
    missing = [c["key"] for c in report["cells"] if not c["val_loss"]]
    if missing:
        print(f"note: {len(missing)} cell(s) have no finished runs yet: {', '.join(missing)}", file=sys.stderr)
    return 0
