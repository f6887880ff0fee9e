"""Sweep grammar and run planning of a comparison: recipes × swept values -> RunSpecs.

    parse_sweep(["dge.k=1,3,5,10", "fmt=e2m1,e1m2"])   # -> {"dge.k": [1.0, 3.0, 5.0, 10.0], "fmt": [...]}
    plan_runs(["bf16", "fp4-paper"], {"dge.k": [1, 3]})  # -> bf16, fp4-paper[dge.k=1], fp4-paper[dge.k=3]
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from lowbit import recipes
from lowbit.recipes import Recipe
from lowbit.suggest import did_you_mean

FP4_FORMATS = ("e2m1", "e1m2", "e3m0")


def _default_value(dc, f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return getattr(dc, f.name, None)


def sweep_keys() -> dict[str, type]:
    """The parameters a sweep may vary, with their value type: every scalar `Recipe.replace` key
    (e.g. dge.k, occ.alpha, input.rounding, scaling) plus `fmt`, which sets the element format of
    input, weight and grad_output together (the paper's E2M1/E1M2/E3M0 layout ablation)."""
    from lowbit.recipes import DGE, OCC, TensorQuant

    keys: dict[str, type] = {"fmt": str}
    nested = {"dge": DGE(), "occ": OCC(), "input": TensorQuant(), "weight": TensorQuant(),
              "grad_output": TensorQuant()}
    for head in ("dge", "occ", "input", "weight", "grad_output"):  # the paper's ablations first
        for g in dataclasses.fields(nested[head]):
            keys[f"{head}.{g.name}"] = type(getattr(nested[head], g.name))
    for f in dataclasses.fields(Recipe):
        if f.name not in nested and f.name not in ("name", "description"):
            keys[f.name] = type(_default_value(Recipe, f))
    return keys


_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a sweep value (from the CLI: a string) to the parameter's type; a clear error otherwise."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        return str(value).strip()
    except (TypeError, ValueError):
        kind = {bool: "true/false (or on/off)", int: "an integer", float: "a finite number"}.get(typ, typ.__name__)
        raise ValueError(f"sweep value {value!r} for {key!r} is not {kind}") from None


def parse_sweep(specs: list[str] | None) -> dict[str, list]:
    """CLI syntax -> sweep dict: ["dge.k=1,3,5,10", "fmt=e2m1,e1m2"] -> {"dge.k": [1.0, 3.0, ...], ...}.
    Unknown keys and malformed values raise ValueError listing what is valid."""
    out: dict[str, list] = {}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"bad --sweep {spec!r}: expected KEY=V1,V2,..., e.g. dge.k=1,3,5,10")
        if key in out:
            raise ValueError(f"--sweep {key} given twice; list all its values once: {key}=V1,V2,...")
        out[key] = [v.strip() for v in values.split(",") if v.strip()]
    return validate_sweep(out) if out else {}


def validate_sweep(sweep: dict[str, list] | None) -> dict[str, list]:
    """Check keys and coerce values to their types. Raises ValueError naming the valid keys."""
    if not sweep:
        return {}
    keys = sweep_keys()
    unknown = [k for k in sweep if k not in keys]
    if unknown:
        raise ValueError(f"unknown sweep parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}{did_you_mean(unknown[0], keys)}; sweep a recipe field, "
                         "nested ones dotted (dge.k, occ.alpha, input.rounding, weight.block, grad_output.rounding, "
                         "scaling, ...), or fmt; `lowbit recipes --show NAME` lists a recipe's fields")
    out = {}
    for key, values in sweep.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"sweep[{key!r}] must be a list of values, got {values!r}")
        vals = [_coerce(key, v, keys[key]) for v in values]
        if not vals:
            raise ValueError(f"sweep[{key!r}] has no values")
        if len(set(map(repr, vals))) != len(vals):
            raise ValueError(f"sweep[{key!r}] repeats a value: {vals}")
        if key == "fmt":
            bad = [v for v in vals if v not in recipes.QUANT_FORMATS]
            if bad:
                raise ValueError(f"sweep fmt value(s) {bad} unknown; choose from {', '.join(recipes.QUANT_FORMATS)}")
        out[key] = vals
    return out


def value_str(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def apply_sweep(recipe: Recipe, key: str, value) -> Recipe:
    """`recipe` with one swept parameter set, renamed `name[key=value]`."""
    label = f"{recipe.name}[{key}={value_str(value)}]"
    if key == "fmt":  # the paper's FP4 layout ablation: every 4-bit operand (fp4-paper's E5M2 gradients stay)
        changes = {f"{op}.fmt": value for op in ("input", "weight", "grad_output")
                   if getattr(recipe, op) is not None and getattr(recipe, op).fmt in FP4_FORMATS}
        if not changes:
            raise ValueError(f"cannot sweep fmt on recipe {recipe.name!r}: it has no 4-bit operand")
    else:
        changes = {key: value}
    try:
        new = recipe.replace(**changes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot sweep {key}={value!r} on recipe {recipe.name!r}: {e}") from None
    desc = f"{recipe.description} [{key}={value_str(value)}]".strip()
    return dataclasses.replace(new, name=label, description=desc)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a comparison."""

    label: str                # unique; the run directory name and the key in results["runs"]
    recipe: Recipe            # what the trainer gets (swept recipes are renamed to the label)
    base: str                 # name of the recipe it was derived from
    param: str | None = None  # swept parameter, if any
    value: Any = None


def plan_runs(recipe_list: list, sweep: dict[str, list] | None = None) -> list[RunSpec]:
    """Expand recipes x sweep into runs. Without a sweep: one run per recipe. With one: every quantized
    recipe is run once per (parameter, value), one parameter at a time (as the paper's ablations);
    unquantized recipes (bf16, fp32) have nothing to sweep and run once, as the reference."""
    if not recipe_list:
        raise ValueError("compare needs at least one recipe, e.g. ['bf16', 'fp4-paper']")
    sweep = validate_sweep(sweep)
    resolved = [recipes.get(r) for r in recipe_list]
    if sweep and not any(r.quantized for r in resolved):
        raise ValueError(f"--sweep {', '.join(sweep)} varies quantization but none of the recipes "
                         f"{[r.name for r in resolved]} is quantized; add e.g. fp4-paper")
    runs = []
    for r in resolved:
        if not sweep or not r.quantized:
            runs.append(RunSpec(r.name, r, r.name))
            continue
        for key, values in sweep.items():
            for v in values:
                s = apply_sweep(r, key, v)
                runs.append(RunSpec(s.name, s, r.name, key, v))
    labels = [s.label for s in runs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"recipe(s) {dup} listed more than once; each run needs a distinct name")
    return runs


def dirname(label: str) -> str:
    """A directory name for a run label that needs no quoting in any shell: `fp4-paper[dge.k=3]` ->
    `fp4-paper_dge.k-3` (labels may also come from TOML recipe names)."""
    name = label.replace("[", "_").replace("]", "").replace("=", "-")
    return re.sub(r"[^\w.\-,+]", "_", name)
