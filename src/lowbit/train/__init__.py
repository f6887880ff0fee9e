"""Training: one TrainConfig drives a run; a Trainer runs it.

    from lowbit.train import TrainConfig, train, load_checkpoint
    res = train(TrainConfig(model="tiny", recipe="fp4-paper", tokens="2M", out="runs/fp4"))
    model, tokenizer, cfg = load_checkpoint("runs/fp4")

Every module and what it owns: docs/architecture.md.
"""
from lowbit._lazy import lazy_exports

# public name -> the module that defines it, imported on first use: `lowbit.train.config` (what the CLI's
# parser and argument errors need) must not pull in torch and the training stack
_LAZY = {"TrainConfig": "config", "parse_count": "config", "evaluate": "evaluation", "load_checkpoint": "evaluation",
         "train": "loop", "TrainResult": "result", "resolve_device": "runtime", "lr_at": "schedule",
         "Trainer": "trainer"}
__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
