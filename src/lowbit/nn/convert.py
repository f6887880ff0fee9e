"""`convert(model, recipe)`: swap a model's linear layers for quantized ones, torchao-style; statistics.

The swap is generic (a filter over (module, fully qualified name)); the policy on top of it: the output
head (any Linear named `lm_head`) stays in high precision unless `recipe.quantize_head`, layers are
numbered in module order (the number seeds each layer's random streams), and `check_block_sizes`
refuses a recipe whose tiles do not divide the widths it tiles.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

from torch import nn

from lowbit import recipes
from lowbit.nn.module import QConv1D, QLinear, is_conv1d
from lowbit.nn.select import high_precision_names
from lowbit.nn.spec import OPERANDS
from lowbit.nn.stats import model_means
from lowbit.recipes import Recipe

FilterFn = Callable[[nn.Module, str], bool]


def _is_head(fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] == "lm_head"


def _targets(model: nn.Module, r: Recipe, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """(fqn, module) of the layers to swap, in module order; raises for a QLinear of another recipe."""
    out = []
    keep = high_precision_names(model, r.high_precision)
    _say_kept(model, r, keep)
    for fqn, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if mod.recipe != r:
                raise ValueError(f"module {fqn or '<root>'} is already a QLinear with recipe {mod.recipe.name!r}; "
                                 f"converting to {r.name!r} would mix recipes: build the model afresh")
            continue
        if type(mod) is not nn.Linear and not is_conv1d(mod):
            continue
        if (_is_head(fqn) and not r.quantize_head) or fqn in keep:
            continue
        if filter_fn is None or filter_fn(mod, fqn):
            out.append((fqn, mod))
    return out


def _say_kept(model: nn.Module, r: Recipe, keep: set[str]) -> None:
    """Log which linear layers the recipe's high-precision selection keeps out of quantization (users of
    `convert` on their own model would not otherwise know that `nvfp4`'s share:16% kept a block in bf16)."""
    kept = [fqn for fqn, m in model.named_modules() if fqn in keep and (type(m) is nn.Linear or is_conv1d(m))]
    if kept:
        _say_once(r.name, ", ".join(r.high_precision), tuple(kept))


@functools.lru_cache(maxsize=None)
def _say_once(recipe: str, patterns: str, kept: tuple[str, ...]) -> None:
    """Once per process and selection (a comparison's timing phase converts the same model again and again)."""
    shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
    logging.getLogger("lowbit").info("recipe %s keeps %d linear layer(s) in high precision (%s): %s", recipe,
                                     len(kept), patterns, shown)


def swap_modules(model: nn.Module, targets: list[tuple[str, nn.Module]],
                 make: Callable[[nn.Module, int], nn.Module]) -> nn.Module:
    """Replace each (fqn, module) of `targets` by make(module, index), in place; returns model (or the
    new module when `model` itself is the only target, which cannot be replaced in place)."""
    if targets and targets[0][0] == "":
        return make(model, 0)
    for i, (fqn, mod) in enumerate(targets):
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(mod, i))
    return model


def convert(model: nn.Module, recipe: "str | Recipe", filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the nn.Linear modules of `model` for QLinear under `recipe`, in place; returns model.
    Hugging Face `Conv1D` layers (GPT-2's projections, weight stored [in, out]) become QConv1D, which keeps
    that layout (the model's state_dict is unchanged).

    recipe: a registered name, a path to a .toml recipe, or a Recipe.
    filter_fn(module, fqn) -> bool: convert only layers for which it returns True.
    `recipe.high_precision` patterns (lowbit.nn.select: first:N, last:N, share:P%, module globs) leave the
    layers they select as they are (high precision), like the head.
    The output head (any Linear whose name is `lm_head`) stays in high precision unless
    `recipe.quantize_head`: the paper quantizes the transformer blocks' GeMMs and keeps the output
    projection precise, since the logits feed a softmax over the whole vocabulary and small relative
    errors there move the loss directly.
    The new modules share the old Parameter objects (an optimizer built before or after the conversion
    works), so device and dtype are unchanged. Every Linear is swapped, also for a recipe that quantizes
    nothing (QLinear then runs F.linear, bit for bit). Converting again with the same recipe is a no-op; an
    existing QLinear with a different recipe raises ValueError (build the model afresh to change recipes).
    """
    r = recipes.get(recipe)  # a Recipe checked itself when it was built
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")

    def make(mod: nn.Module, i: int) -> nn.Module:
        return QConv1D.from_conv1d(mod, r, i) if is_conv1d(mod) else QLinear.from_linear(mod, r, layer_idx=i)

    return swap_modules(model, _targets(model, r, filter_fn), make)


def qlinears(model: nn.Module) -> list[QLinear]:
    return [m for m in model.modules() if isinstance(m, QLinear)]


def collect_stats(model: nn.Module, enabled: bool = True) -> None:
    """Switch the (cheap, but not free) quantization statistics of every QLinear on or off."""
    for m in qlinears(model):
        m.collect_stats = enabled


def layer_records(model: nn.Module) -> list[dict]:
    """{"layer", "gemm", "operand", statistic: mean} of every QLinear's statistics (lowbit.nn.stats) since the last
    call, then reset. `layer` is the module's name in the user's model (without DDP's `module.`, FSDP's or
    torch.compile's `_orig_mod.` wrappers)."""
    out = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, QLinear):
            name = ".".join(p for p in fqn.split(".") if p not in ("_orig_mod", "module", "_fsdp_wrapped_module"))
            for (gemm, op), stats in mod.qstate.stats.pop().items():
                out.append({"layer": name, "gemm": gemm, "operand": op, **stats})
    return out


def quant_stats(model: nn.Module) -> dict[str, float]:
    """The model-wide means of the statistics gathered since the last call, then reset (lowbit.nn.stats.MEANS):
    occ_clamped_frac (fraction of activation entries clamped), underflow_frac_{input,weight,grad_output}
    (fraction of nonzero entries quantized to zero) and underflow_frac (their mean); each the mean over layers of
    the layer's record. Keys with no data are absent (statistics off, or nothing quantized)."""
    return model_means(layer_records(model))


def check_block_sizes(model: nn.Module, recipe: Recipe, model_name: str) -> None:
    """Refuse a recipe whose tile/block size does not divide a layer width it tiles: the input's and weight's
    tiles run along in_features (the forward reduction dim), 2-D weight blocks also along out_features, and the
    output gradient's tiles along out_features (the reduction dim of dX). The quantizer would pad the ragged
    last tile (its own scale over fewer values), which no hardware block format does, so the run would not be
    the recipe it claims to be. (QLinear itself still pads, for models converted through the Python API.)"""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QLinear)]
    for role, q in ((op, getattr(recipe, op)) for op in OPERANDS):
        if q is None or q.granularity not in ("tile", "block"):
            continue
        w_axis = ("out_features",) if recipe.weight_scale_axis == "in" else ("in_features",)
        dims = {"input": ("in_features",), "grad_output": ("out_features",),
                "weight": ("out_features", "in_features") if q.granularity == "block" else w_axis}[role]
        widths = sorted({getattr(m, d) for _, m in layers for d in dims})
        for name, m in layers:
            for d in dims:
                if getattr(m, d) % q.block:
                    fits = [b for b in (8, 16, 32, 64, 128, 256) if all(w % b == 0 for w in widths)]
                    raise ValueError(
                        f"recipe {recipe.name!r} quantizes {role} in {q.granularity}s of {q.block}, which does not "
                        f"divide layer {name}'s {d}={getattr(m, d)} (model {model_name!r}); use a recipe whose "
                        f"{role}.block divides {', '.join(map(str, widths))}"
                        + (f" (e.g. {fits[-1]})" if fits else "") + ", or another --model")
