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
from lowbit.train.config import TrainConfig, parse_count
from lowbit.train.evaluation import evaluate, load_checkpoint
from lowbit.train.loop import train
from lowbit.train.result import TrainResult
from lowbit.train.runtime import resolve_device
from lowbit.train.schedule import lr_at
from lowbit.train.trainer import Trainer

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "evaluate", "load_checkpoint", "lr_at", "parse_count",
           "resolve_device"]
