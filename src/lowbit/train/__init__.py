"""Training: one TrainConfig drives a run; a Trainer runs it.

    from lowbit.train import TrainConfig, train, load_checkpoint
    res = train(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4"))
    model, tokenizer, cfg = load_checkpoint("runs/fp4")

Where things are:
    config.py        TrainConfig; its field metadata is the one description of every option
    trainer.py       Trainer: setup phases, train(), train_step(), evaluate_due(), save(), states()
    loop.py          train(cfg): the thin entry point (process group join/leave)
    rundir.py        RunDir: the run directory's layout and the rules for touching it
    checkpoint.py    atomic, checksummed checkpoint files; checkpointer.py: CheckpointManager (save policy)
    state.py         TrainState, RNGState, QuantState (the checkpointed states besides weights/optimizer)
    runtime.py       device, seeding, autocast, hashes, peak memory, the optimizer, apply_recipe
    evaluation.py    validation loss, loading a run back (eval / generate / export)
    metrics.py       metric rows -> JSONL, CSV, TensorBoard; result.py: TrainResult, StepTimer
    signals.py       SIGINT/SIGTERM -> checkpoint and TrainingInterrupted
    dist.py          torchrun, DDP / FSDP2; compile.py: --compile with an eager fallback; schedule.py: LR
"""
import importlib

# public name -> the module that defines it, imported on first use: `lowbit.train.config` (what the CLI's
# parser and argument errors need) must not pull in torch and the training stack
_LAZY = {"TrainConfig": "config", "parse_count": "config", "evaluate": "evaluation", "load_checkpoint": "evaluation",
         "train": "loop", "TrainResult": "result", "resolve_device": "runtime", "lr_at": "schedule",
         "Trainer": "trainer"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"lowbit.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lowbit.train' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
