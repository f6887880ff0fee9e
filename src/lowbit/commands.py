"""The `lowbit` subcommands other than train and compare: eval, generate, export, flops, recipes.
Each takes the parsed arguments and returns the exit status; lowbit.cli parses and handles errors."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys

from lowbit import recipes


def cmd_eval(args) -> int:
    if args.list_tasks or args.tasks:
        return cmd_eval_tasks(args)
    if args.ckpt is None:
        raise ValueError("lowbit eval needs --ckpt DIR (a run directory or checkpoint), or --list-tasks")
    for flag in ("limit", "include_path"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to zero-shot tasks; add --tasks LIST")
    # --recipe: the trained weights under another recipe, prepared exactly as training prepares a model
    from lowbit.comparison.runner import resolve_run
    from lowbit.data import prepare_dataset
    from lowbit.train.evaluation import evaluate, load_run

    model, tok, cfg, recipe, ckpt_dir = load_run(resolve_run(args.ckpt, args.run), args.device, recipe=args.recipe)
    changes = {k: getattr(args, k) for k in ("eval_batches", "batch_size") if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    data = cfg.data if args.data is None else args.data
    ds = prepare_dataset(data, tokenizer=tok, val_fraction=cfg.val_fraction)
    res = evaluate(model, ds, cfg, recipe=recipe)
    res.update(checkpoint=str(ckpt_dir), recipe=recipe.name, batches=cfg.eval_batches,
               tokens=cfg.eval_batches * cfg.batch_size * cfg.seq_len)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"checkpoint {ckpt_dir} (recipe {recipe.name}): {res['tokens']:,} validation tokens")
        print(f"val_loss {res['val_loss']:.4f}")
        print(f"perplexity {res['perplexity']:.3f}")
    return 0


def cmd_eval_tasks(args) -> int:
    """`lowbit eval --tasks` / `--list-tasks`: zero-shot accuracy through lm-evaluation-harness."""
    from pathlib import Path

    from lowbit.downstream import run, table, tasks

    if args.list_tasks:
        rows = tasks.list_rows()
        print(json.dumps(rows) if args.json else "\n".join(
            f"{r['task']:<34} {r['items']:>4} items  chance {table.chance(r['chance']):>3}  {r['form']} from "
            f"{r['corpus']}'s held-out tail" for r in rows))
        return 0
    if args.ckpt is None:
        raise ValueError("lowbit eval --tasks needs --ckpt DIR: a run, a comparison directory or a Hugging Face folder")
    if args.eval_batches is not None or args.data is not None:
        raise ValueError("--eval-batches and --data apply to the validation loss; drop them with --tasks")
    names = tasks.expand(args.tasks)
    kw = dict(device=args.device, limit=args.limit, batch_size=args.batch_size or 16, include_path=args.include_path)
    ckpt = Path(args.ckpt)
    if (ckpt / "results.json").is_file() and (ckpt / "runs").is_dir() and args.run is None:
        summary = run.eval_comparison(ckpt, names, recipe=args.recipe, **kw)
        print(json.dumps(summary) if args.json else "\n".join(table.markdown_section(summary)))
        return 0
    if (ckpt / "config.json").is_file() and not (ckpt / "ckpt").exists() and not (ckpt / "meta.json").exists():
        if args.recipe is not None:
            raise ValueError("--recipe needs a lowbit run; a Hugging Face folder is evaluated as it is")
        res = run.eval_hf(ckpt, names, **kw)
    else:
        from lowbit.comparison.runner import resolve_run
        res = run.eval_run(resolve_run(ckpt, args.run), names, recipe=args.recipe, **kw)
    print(json.dumps(res) if args.json else table.run_table(res))
    return 0


def cmd_generate(args) -> int:
    import torch

    from lowbit.comparison.runner import resolve_run
    from lowbit.train.evaluation import load_run
    from lowbit.train.runtime import autocast

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # the fp32 master weights by default: a recipe's quantized GeMMs are a training-time simulation (slow on a CPU)
    model, tok, _, recipe, _ = load_run(resolve_run(args.ckpt, args.run), args.device, recipe=args.recipe or "fp32")
    if args.recipe is None:
        logging.getLogger("lowbit").info("sampling from the run's high-precision master weights (fp32); "
                                         "--recipe NAME samples through a recipe's simulated GeMMs")
    device = next(model.parameters()).device
    ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]  # empty prompt: start a new document
    idx = torch.tensor([ids[-model.config.block_size:]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    new, shown = [], ""
    with autocast(recipe, device):
        for nxt in model.stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                generator=gen):
            new.append(int(nxt))
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # a partial UTF-8 character waits for its next byte
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
    return 0


def cmd_export(args) -> int:
    try:
        from lowbit.export import export
        res = export(args.ckpt, args.out, to=args.to, weights_format=args.weights_format)
    except ImportError as e:  # transformers missing: name the extra to install
        raise ValueError(str(e)) from None
    print(export_summary(res))
    return 0


def export_summary(res: dict) -> str:
    """The line `lowbit export` prints: where, what, and the size on disk as a multiple of the bf16 size."""
    ratio = res["weights_bytes"] / res["bf16_bytes"] if res["bf16_bytes"] else float("nan")
    return (f"wrote {res['out']} ({res['architecture']}, {res['weights_format']} weights): "
            f"{res['weights_bytes'] / 1e6:.2f} MB of weights on disk, {ratio:.2f}x the "
            f"{res['bf16_bytes'] / 1e6:.2f} MB they take in bf16")


def cmd_flops(args) -> int:
    if not (args.list or args.model):
        raise ValueError("lowbit flops needs --model NAME (or --list to see the presets)")
    from lowbit import flops
    from lowbit.models import get_config

    if args.list:
        print(flops.presets_table())
        return 0
    over = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    config = get_config(args.model, **over)
    peak = None if args.peak is None else args.peak * 1e12
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"--peak must be a positive number of TFLOP/s, got {args.peak}")
    device = None
    if args.gpu is not None:
        if peak is not None:
            raise ValueError("give --peak or --gpu, not both")
        peak, device = flops.gpu_peak_flops(args.gpu, args.format), f"{args.gpu} ({args.format} GeMMs)"
        if peak is None:
            known = ", ".join(k for k, _ in flops.PEAK_FORMATS[args.format])
            raise ValueError(f"no {args.format} peak known for GPU {args.gpu!r}; known: {known} (or give --peak)")
    print(flops.format_report(config, seq_len=args.seq, mfu=args.mfu, peak=peak, name=args.model,
                              device_name=device))
    return 0


def high_precision_summary(recipe, model_name: str) -> str:
    """TOML comment lines naming the linear layers `recipe` keeps in high precision on the `model_name` preset."""
    import torch

    from lowbit.models import build_model
    from lowbit.nn.convert import convert
    from lowbit.nn.module import QLinear
    from lowbit.nn.select import block_list

    model = convert(build_model(model_name, vocab_size=256), recipe)
    kept = [n for n, m in model.named_modules()
            if (type(m) is torch.nn.Linear or type(m).__name__ == "Conv1D") and not isinstance(m, QLinear)]
    prefix, n = block_list(model)
    blocks = sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in kept if prefix and k.startswith(prefix + ".")})
    lines = [f"# on {model_name} ({n} blocks): {len(kept)} linear layers stay in high precision"]
    if blocks:
        lines.append(f"#   blocks {', '.join(map(str, blocks))} of {prefix}")
    lines += [f"#   {k}" for k in kept if not (prefix and k.startswith(prefix + "."))]
    return "\n".join(lines)


def cmd_recipes(args) -> int:
    if args.show:
        r = recipes.get(args.show)
        sys.stdout.write(r.to_toml())
        if args.model:
            print(high_precision_summary(r, args.model))
        return 0
    names = recipes.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {recipes.get(name).description}")
    return 0


def cmd_inspect(args) -> int:
    from lowbit.comparison.runner import resolve_run
    from lowbit.precision import inspect_run

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    run_dir = resolve_run(args.run_dir, args.run)
    print(inspect_run(run_dir, args.over_time, args.top))
    return 0
