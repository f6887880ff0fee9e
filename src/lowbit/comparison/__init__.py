"""Comparisons: the same model, data and seed under several recipes, one report (`lowbit compare`).

    from lowbit.comparison import compare      # also lowbit.compare
    res = compare(["bf16", "fp4-paper"], TrainConfig(model="tiny", tokens=200_000), out="runs/cmp")

Every module and what it owns: docs/architecture.md.
"""
from lowbit._lazy import lazy_exports

# public name -> its module, imported on first use (the CLI's parser must not pull in torch)
_LAZY = {"DEFAULT_RECIPES": "cli", "add_cli": "cli", "command_line": "command", "default_eval_interval": "cli",
         "run_cli": "cli", "machine_info": "records", "RESULTS_JSON": "runner", "compare": "runner",
         "RunSpec": "sweep", "apply_sweep": "sweep", "parse_sweep": "sweep", "plan_runs": "sweep",
         "sweep_keys": "sweep", "validate_sweep": "sweep"}
__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
