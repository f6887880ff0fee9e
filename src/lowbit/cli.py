"""The `lowbit` command (also `python -m lowbit`).

    lowbit train --model tiny --recipe fp4-paper --tokens 2M --out runs/fp4
    lowbit train --config run.toml --lr 3e-4          # options override the file
    lowbit eval --ckpt runs/fp4
    lowbit generate --ckpt runs/fp4 --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50
    lowbit flops --model gpt2-small --seq 1024 --peak 71
    lowbit recipes [--show fp4-paper]
    lowbit compare --recipes bf16,fp4-paper --model tiny --tokens 1M --out runs/cmp

Errors in the input (bad option values, missing files) print `lowbit: error: <message>` and exit with 2.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import re
import signal
import sys

from lowbit import commands
from lowbit.train.config import option_flag

_LOG_HANDLER_NAME = "lowbit-cli"

def _count(text: str) -> int:
    from lowbit.train.config import parse_count

    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from lowbit.train.config import TrainConfig, field_names, field_types, option_help

    defaults = TrainConfig.__dataclass_fields__
    types = field_types()
    p.add_argument("--config", metavar="FILE.toml",
                   help="TrainConfig TOML file (flat keys, e.g. lr = 1e-3); command-line options override it")
    for name in field_names():
        default = defaults[name].default
        help_ = option_help(name)  # TrainConfig's field metadata: the one description of each option
        if types[name] is bool:
            action = argparse.BooleanOptionalAction if name == "compile" else "store_true"
            p.add_argument(option_flag(name), dest=name, action=action, default=argparse.SUPPRESS, help=help_)
            continue
        typ = _count if name == "tokens" else types[name]
        shown = f"{default:,}" if name == "tokens" else default
        if default is not None:
            help_ += f" (default: {shown})"
        p.add_argument(option_flag(name), dest=name, type=typ, default=argparse.SUPPRESS, metavar=name.upper(), help=help_)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help="train in N processes on this machine (launches torchrun; DDP, or FSDP2 with --fsdp); "
                        "--batch-size stays the global batch (default: 1)")


def _train_config(args):
    from lowbit.train import TrainConfig
    from lowbit.train.config import field_names

    overrides = {k: getattr(args, k) for k in field_names() if hasattr(args, k)}
    if args.config:
        return TrainConfig.from_toml(args.config, **overrides)
    return TrainConfig(**overrides)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_train(args) -> int:
    from lowbit.train import dist, train

    cfg = _train_config(args)  # validated here, before any process is started
    if args.nproc > 1 and not dist.launched_by_torchrun():
        if cfg.batch_size % args.nproc:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) does not divide over --nproc "
                             f"{args.nproc}; use a multiple of {args.nproc}")
        return dist.launch(args.nproc, _without_nproc(args.argv))
    res = train(cfg, progress=not args.no_progress)
    if _rank() != 0:  # under torchrun rank 0 reports
        return 1 if res.diverged_at_step is not None else 0
    val = "n/a" if res.final_val_loss is None else f"{res.final_val_loss:.4f}"
    if res.final_val_loss is not None and math.isfinite(res.final_val_loss):
        val += f" (perplexity {math.exp(min(res.final_val_loss, 700)):.2f})"
    mfu = "" if res.mfu is None else f", MFU {res.mfu:.1%}"
    print(f"{res.steps} steps, {res.tokens:,} tokens: train loss {res.final_train_loss:.4f}, val loss {val}; "
          f"{res.tokens_per_s:,.0f} tokens/s{mfu}; {res.wall_time_s:.1f} s")
    print(f"run directory: {res.out}")
    if res.diverged_at_step is not None:
        print(f"lowbit: error: training diverged at step {res.diverged_at_step} (non-finite loss); "
              "try a lower --lr or another recipe", file=sys.stderr)
        return 1
    return 0


class UsageError(Exception):
    """A command-line error argparse found; `parser` is the (sub)command's parser it found it in."""

    def __init__(self, message: str, parser: argparse.ArgumentParser):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing a usage block and exiting (main prints one line)."""

    def error(self, message):
        raise UsageError(message, self)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def usage_error_line(e: UsageError, extra: list[str] | None = None) -> str:
    """`lowbit: error: ...` in one line, with "did you mean" for a misspelled option or command and the help to
    read. `extra`: the arguments the (sub)command did not recognise."""
    msg, parser = str(e), e.parser
    if extra:
        options = [o for a in parser._actions for o in a.option_strings]
        msg = f"unrecognized arguments: {' '.join(extra)}"
        unknown = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
        msg += _did_you_mean(unknown[0], options) if unknown else ""
    m = re.match(r"argument COMMAND: invalid choice: '([^']*)'", msg)
    if m:
        msg += _did_you_mean(m.group(1), _commands(parser))
    return f"lowbit: error: {msg}; see `{parser.prog} --help`"


def _commands(parser) -> list[str]:
    return [c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]


def parse(argv: list[str] | None):
    """Parsed arguments, or UsageError (with `.line`, the one-line message to print)."""
    parser, extra = build_parser(), None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
            raise UsageError("unrecognized arguments", sub)
    except UsageError as e:
        e.line = usage_error_line(e, extra if str(e) == "unrecognized arguments" else None)
        raise
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lowbit", description="Train GPT-2/LLaMA-style language models in FP4/FP8 (BF16/FP32 reference) "
                                   "and compare recipes side by side.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_eval, _add_generate, _add_flops, _add_recipes, _add_inspect, _add_export):
        add(sub)
    from lowbit.comparison import add_cli  # train the same model under several recipes, one report

    add_cli(sub)
    from lowbit.comparison.ladder_cli import add_cli as add_ladder  # compare over sizes x tokens per parameter

    add_ladder(sub)
    return parser


_CKPT_HELP = "run directory (its newest valid checkpoint) or a ckpt/step_XXXXXXX directory"
_DEVICE_HELP = "auto (cuda when available), cpu, cuda, cuda:N (default: auto)"
_RUN_HELP = "with a comparison directory as --ckpt: the run to use (its label, e.g. fp4-paper)"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from scratch (or resume a run)",
                       description="Train a model under a recipe. Every option is also a key of a --config TOML "
                                   "file; options given on the command line override the file.")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss of a checkpoint, or zero-shot accuracy with --tasks",
                       description="Evaluate a checkpoint on the validation split of its training data (the same "
                                   "fixed batches the trainer used), or with --tasks on zero-shot tasks through "
                                   "lm-evaluation-harness (a run, every run of a comparison, or a Hugging Face "
                                   "folder; results in eval.json).")
    p.add_argument("--ckpt", metavar="DIR", help=_CKPT_HELP + ", a comparison directory (--tasks: every run) or "
                   "a Hugging Face folder (--tasks)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--data", default=None, help="evaluate on the validation split of this data instead")
    p.add_argument("--recipe", default=None, help="evaluate under this recipe instead of the training recipe "
                   "(with --tasks: instead of the fp32 master weights)")
    p.add_argument("--run", default=None, metavar="LABEL", help=_RUN_HELP)
    p.add_argument("--eval-batches", type=_positive_int, default=None,
                   help="validation batches (default: the run's eval_batches)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per batch (default: the run's batch_size; with --tasks: 16)")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="zero-shot tasks, comma-separated: lowbit's offline tasks (`lowbit` = all of them), "
                        "lm-eval task names, or `fp4-paper` (the FP4 paper's nine; need the hub)")
    p.add_argument("--list-tasks", action="store_true", help="list lowbit's offline tasks and exit")
    p.add_argument("--limit", type=_positive_int, default=None, help="--tasks: at most this many items per task")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="--tasks: a folder of lm-eval task YAML files (e.g. over a local copy of a dataset)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=commands.cmd_eval)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV-cached)",
                       description="Sample a continuation of --prompt from a trained checkpoint.")
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help=_CKPT_HELP)
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--recipe", default=None,
                   help="sample through this recipe's simulated GeMMs (e.g. the training recipe); default: the "
                        "high-precision (fp32) master weights, which is what the model is after training")
    p.add_argument("--run", default=None, metavar="LABEL", help=_RUN_HELP)
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.set_defaults(func=commands.cmd_generate)


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="parameters, FLOPs per token, KV cache and MFU budget of a model preset",
                       description="Print the parameter / FLOPs / KV-cache accounting of a model preset.")
    p.add_argument("--model", help="model preset name (required unless --list)")
    p.add_argument("--list", action="store_true", help="list every model preset with its shape and parameters")
    p.add_argument("--seq", type=_positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--mfu", type=float, default=0.4, help="utilisation for the time estimate, a fraction (default: 0.4)")
    p.add_argument("--peak", type=float, default=None, metavar="TFLOPS",
                   help="device peak in TFLOP/s (e.g. 989 for an H100 SXM in BF16): adds tokens/s and time at --mfu")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="take the peak from lowbit's datasheet table for this GPU (e.g. H100, B200) instead of --peak")
    p.add_argument("--format", default="bf16", choices=("bf16", "fp8", "fp4"),
                   help="GeMM format of that peak: bf16, or fp8/fp4 for real low-precision GeMMs (default: bf16)")
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="override the preset's vocabulary size")
    p.set_defaults(func=commands.cmd_flops)


def _add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the training recipes",
                       description="List the registered recipes, or print one as TOML (a starting point for a "
                                   "custom recipe file: lowbit train --recipe my.toml).")
    p.add_argument("--show", metavar="NAME", help="print this recipe as TOML")
    p.add_argument("--model", metavar="PRESET", help="with --show: also list the layers the recipe keeps in high "
                                                     "precision on this model preset")
    p.set_defaults(func=commands.cmd_recipes)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show where a run loses precision (per-layer quantization statistics)",
                       description="Print the layers with the largest quantization error, underflow and "
                                   "saturation at the run's last statistics step (from RUN_DIR/quant_stats.jsonl) "
                                   "and write RUN_DIR/precision.png: heatmaps of layers x GeMM operands.")
    p.add_argument("run_dir", help="a run directory (lowbit train --out); with --run, a comparison directory")
    p.add_argument("--run", help="with a comparison directory as RUN_DIR: the run to inspect (its label, e.g. "
                                 "fp4-paper)")
    p.add_argument("--over-time", action="store_true", help="heatmaps of layers x steps instead (mean over operands)")
    p.add_argument("--top", type=int, default=5, help="layers listed per statistic (default: 5)")
    p.set_defaults(func=commands.cmd_inspect)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face model directory",
                       description="Write a run's weights and tokenizer as a Hugging Face directory that "
                                   "transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained load offline "
                                   "(GPT family -> GPT2LMHeadModel, llama family -> LlamaForCausalLM). With "
                                   "--weights-format fp4|fp8 the block weights are stored packed with their scales "
                                   "(load with lowbit.export.load_packed).")
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help=_CKPT_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--to", default="hf", choices=["hf"], help="target format (default: hf)")
    p.add_argument("--weights-format", default="fp32", choices=["fp32", "bf16", "fp4", "fp8"],
                   help="fp32/bf16: standard model.safetensors; fp4/fp8: packed E2M1/E4M3 codes with per-channel "
                        "fp32 scales for the transformer-block weights (default: fp32)")
    p.set_defaults(func=commands.cmd_export)


class _Formatter(logging.Formatter):
    def format(self, record):
        prefix = "lowbit: " if record.levelno < logging.WARNING else f"lowbit: {record.levelname.lower()}: "
        return prefix + record.getMessage()


def _setup_logging() -> None:
    logger = logging.getLogger("lowbit")
    if not any(getattr(h, "name", None) == _LOG_HANDLER_NAME for h in logger.handlers):
        h = logging.StreamHandler()  # stderr
        h.name = _LOG_HANDLER_NAME
        h.setFormatter(_Formatter())
        logger.addHandler(h)
    logger.setLevel(logging.INFO)


def _rank() -> int:
    """torchrun's RANK of this process (0 when not launched by torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lowbit` console script; returns the exit status."""
    try:
        args = parse(argv)
    except UsageError as e:
        print(e.line, file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    rank = _rank()
    if rank != 0:  # under torchrun only rank 0 talks
        logging.getLogger("lowbit").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        dist = sys.modules.get("lowbit.train.dist")  # (not imported by commands that do not train)
        if not (dist and isinstance(e, dist.MainRankError)):  # else rank 0 printed the same message
            print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if getattr(e, "signum", None) is not None and args.command == "train":  # signals.TrainingInterrupted
            if rank == 0:
                print(f"lowbit: stopped by {signal.Signals(e.signum).name} after step {e.step}; a checkpoint was "
                      "written: continue with the same command and --resume", file=sys.stderr)
            return 128 + e.signum
        hint = _interrupt_hint(args)
        print(f"lowbit: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def _interrupt_hint(args) -> str:
    """What to do after a Ctrl-C that stopped at once: compare re-runs; train resumes only from a checkpoint."""
    if args.command == "compare":
        return ("re-run the same command to continue: finished recipes are kept, the interrupted one continues "
                "from its last checkpoint")
    if args.command == "train":
        from lowbit.train.rundir import RunDir

        out = getattr(args, "out", None)  # (train's options default to argparse.SUPPRESS)
        if out is None or RunDir(out).has_checkpoint():
            return "continue from the last checkpoint by re-running with --resume"
        return "no checkpoint was written yet: re-run the same command with --overwrite to start again"
    return "nothing was saved"
