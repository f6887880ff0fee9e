"""Comparisons: the same model, data and seed under several recipes, one report (`lowbit compare`).

    from lowbit.comparison import compare      # also lowbit.compare
    res = compare(["bf16", "fp4-paper"], TrainConfig(model="tiny", tokens=200_000), out="runs/cmp")

Where things are:
    sweep.py     sweep grammar (KEY=V1,V2,...) and run planning (recipes × values -> RunSpecs)
    records.py   run records and summaries: the reference, gaps, like-for-like checks, machine/model info
    runner.py    compare(): runs or reuses every RunSpec, writes results.json and the report
    cli.py       `lowbit compare` options (from TrainConfig's metadata), the reproducing command line
Rendering (tables, charts, report.md) is lowbit.report's.
"""
from lowbit.comparison.cli import DEFAULT_RECIPES, add_cli, command_line, default_eval_interval, run_cli
from lowbit.comparison.records import machine_info
from lowbit.comparison.runner import RESULTS_JSON, compare
from lowbit.comparison.sweep import RunSpec, apply_sweep, parse_sweep, plan_runs, sweep_keys, validate_sweep

__all__ = ["compare", "plan_runs", "parse_sweep", "validate_sweep", "sweep_keys", "apply_sweep", "RunSpec",
           "command_line", "add_cli", "run_cli", "default_eval_interval", "machine_info", "DEFAULT_RECIPES",
           "RESULTS_JSON"]
