"""`train(cfg)`: the thin entry point over lowbit.train.trainer.Trainer.

    from lowbit.train import TrainConfig, train
    res = train(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4"))

Under torchrun (WORLD_SIZE > 1) this process joins the process group (lowbit.train.dist) for the run and
leaves it afterwards.
"""
from __future__ import annotations

from lowbit.train import dist
from lowbit.train.config import TrainConfig
from lowbit.train.result import TrainResult
from lowbit.train.runtime import resolve_device
from lowbit.train.trainer import Trainer


def train(cfg: TrainConfig, progress: bool = True, dataset=None, trainer: type[Trainer] = Trainer) -> TrainResult:
    """Train per `cfg` (see lowbit.train.trainer). `dataset` (a lowbit.data.Dataset) skips data preparation
    (cfg.data/tokenizer/vocab_size/val_fraction are then not used); `trainer`: a Trainer subclass to run.
    Returns the TrainResult. SIGINT/SIGTERM: the current step finishes, a checkpoint is written,
    TrainingInterrupted is raised."""
    cfg.resolved_recipe()  # an unknown recipe fails before any process group is joined
    di, device = dist.setup(resolve_device(cfg.device))
    try:
        return trainer(cfg, progress, dataset, di=di, device=device).train()
    finally:
        dist.teardown(di)
