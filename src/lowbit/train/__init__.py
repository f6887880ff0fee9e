"""Trainer: config, loop, checkpoints, schedule, metrics.

    from lowbit.train import TrainConfig, train, load_checkpoint
    res = train(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4"))
    model, tokenizer, cfg = load_checkpoint("runs/fp4")
"""
from lowbit.train.config import TrainConfig, parse_count
from lowbit.train.loop import TrainResult, evaluate, load_checkpoint, resolve_device, train
from lowbit.train.schedule import lr_at

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "load_checkpoint", "lr_at", "parse_count",
           "resolve_device"]
