"""Validation loss of a model, and loading a trained run back for eval / generate / export."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lowbit import recipes
from lowbit.data import Tokenizer, eval_batches
from lowbit.train import checkpoint, dist, weights
from lowbit.train.config import TrainConfig
from lowbit.train.rundir import RunDir
from lowbit.train.runtime import apply_recipe, autocast, resolve_device


def eval_loss(model: torch.nn.Module, batches: list, recipe: recipes.Recipe, device: torch.device,
              di: dist.DistInfo | None = None) -> float:
    """Mean loss over fixed batches, in eval mode, under the recipe's autocast; with `di` (several ranks, each
    with its slice of every batch) the mean over ranks, i.e. the loss of the global batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad(), autocast(recipe, device):
        for x, y in batches:
            _, loss = model(x, y.contiguous())
            total += loss.double()
    model.train(was_training)
    if di is not None and di.distributed:
        dist.all_reduce_sum(total, di)
        total /= di.world_size
    return float(total) / len(batches)


def evaluate(model: torch.nn.Module, dataset, cfg: TrainConfig, recipe: recipes.Recipe | None = None,
             device: str | torch.device | None = None) -> dict:
    """Validation loss over `cfg.eval_batches` fixed batches of `dataset.val` (the run's own batches) and
    its perplexity exp(loss). `recipe` (default: cfg.recipe) sets the autocast dtype; `device` defaults
    to the model's."""
    recipe = cfg.resolved_recipe() if recipe is None else recipe
    device = next(model.parameters()).device if device is None else torch.device(device)
    if len(dataset.val) == 0:
        raise ValueError("the dataset has no validation split (val_fraction=0); nothing to evaluate")
    batches = list(eval_batches(dataset.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device))
    loss = eval_loss(model, batches, recipe, device)
    return {"val_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def load_run(path, device="cpu", recipe: "str | recipes.Recipe | None" = None):
    """(model, tokenizer, cfg, recipe, ckpt_dir) from a run directory or checkpoint directory. The model is
    prepared for `recipe` (default: the one it was trained with, rebuilt from the checkpoint since its
    .toml file may be gone), moved to `device`, in eval mode."""
    from lowbit.models import build_model, config_from_dict

    ckpt_dir, meta = checkpoint.resolve(path)
    tok = Tokenizer.load(RunDir.of_checkpoint(ckpt_dir).tokenizer)
    trained = recipes.Recipe.from_dict(meta["recipe"])
    recipe = trained if recipe is None else recipes.get(recipe)
    saved = dict(meta["config"])
    cfg = TrainConfig.from_dict({**saved, "recipe": "fp32"})  # the recipe file may be gone: not re-validated
    cfg.recipe = saved["recipe"]
    model = apply_recipe(build_model(config_from_dict(meta["model_config"])), recipe)
    weights.load_weights(model, ckpt_dir)
    model.to(resolve_device(str(device))).eval()
    return model, tok, cfg, recipe, Path(ckpt_dir)


def load_checkpoint(out_or_ckpt_dir, device="cpu"):
    """(model, tokenizer, cfg) from a run directory (its newest valid checkpoint) or a checkpoint directory.
    The model is converted with the recipe it was trained with, moved to `device`, in eval mode."""
    model, tok, cfg, _, _ = load_run(out_or_ckpt_dir, device)
    return model, tok, cfg
