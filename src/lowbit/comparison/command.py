"""What a comparison is on the command line: the options `lowbit compare` passes to every run (generated
from TrainConfig's field metadata) and the command line that reproduces a comparison (results.json keeps it)."""
from __future__ import annotations

import argparse
import shlex

from lowbit import recipes
from lowbit.comparison.sweep import value_str
from lowbit.recipes import Recipe
from lowbit.train.config import TrainConfig, compare_fields, field_types, option_flag, option_help, parse_count


def shared_options() -> list[tuple[str, type, str]]:
    """(TrainConfig field, argparse type, help) of every option `lowbit compare` passes to all runs."""
    types = field_types()
    return [(f, _count_arg if f == "tokens" else types[f], option_help(f)) for f in compare_fields()
            if types[f] is not bool]


def _count_arg(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def command_line(recipe_list: list, base, out, sweep: dict[str, list] | None = None,
                 config_path: str | None = None) -> str:
    """The `lowbit compare` command that reproduces a comparison: recipes, model, tokens, seed, out, the sweep,
    and every train option that differs from TrainConfig's defaults. Custom Recipe objects that are neither
    registered nor files are named, with a note (their full definition is in results.json)."""
    default = TrainConfig()
    names, custom = [], []
    for r in recipe_list:
        if isinstance(r, Recipe):
            names.append(r.name)
            if r.name not in recipes.names() or recipes.get(r.name) != r:
                custom.append(r.name)
        else:
            names.append(str(r))
    parts = ["lowbit", "compare", "--recipes", ",".join(names)]
    if config_path:
        parts += ["--config", str(config_path)]
    for field, _, _ in shared_options():
        v = getattr(base, field, None)
        if field in ("model", "tokens", "seed") or v != getattr(default, field, None):
            if v is not None:
                parts += [option_flag(field), value_str(v) if not isinstance(v, str) else v]
    if getattr(base, "compile", False):
        parts.append("--compile")
    parts += ["--out", str(out)]
    for key, values in (sweep or {}).items():
        parts += ["--sweep", f"{key}={','.join(value_str(v) for v in values)}"]
    cmd = " ".join(shlex.quote(p) for p in parts)
    if custom:
        cmd += f"  # custom recipe object(s) {custom}: definitions in results.json (config.recipe)"
    return cmd
