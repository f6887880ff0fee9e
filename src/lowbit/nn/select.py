"""Layer selection: which linear layers a recipe keeps in high precision (`Recipe.high_precision`).

A selection is a list of patterns, comma-separated on the command line (`--high-precision first:2,last:8`):

    first:N     the linear layers of the first N transformer blocks
    last:N      those of the last N blocks
                N is a count or a share of the blocks, "12.5%" (rounded to the nearest block)
    share:P%    NVIDIA's NVFP4 policy (arXiv 2509.25149, 12B model: first 2 and last 8 of 62 blocks):
                n = max(1, round(P% of the blocks)) blocks, a fifth of them (rounded down) at the start, the
                rest at the end; `share:16%` gives 2 + 8 of 62, 0 + 2 of 12, 0 + 1 of 4
    GLOB        any other pattern matches fully qualified module names (fnmatch): `*.attn.c_proj`, `lm_head`

The blocks are the entries of the model's longest outermost nn.ModuleList that holds linear layers (GPT-2's
`transformer.h`, LLaMA's `model.layers`; never a MoE layer's `experts`, which lie inside the blocks); a module
belongs to block i when its name lies under `<list>.i.`.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from lowbit.layer_patterns import HIGH_PRECISION_BLOCK as _BLOCK
from lowbit.layer_patterns import check_patterns
from lowbit.suggest import did_you_mean

def block_list(model: nn.Module) -> tuple[str, int]:
    """(qualified name, length) of the model's longest outermost ModuleList that contains linear layers; ("", 0)
    if none. Outermost: a list inside another such list (a mixture-of-experts layer's experts, inside the
    transformer's blocks) is never the blocks, however many entries it has."""
    best, outer = ("", 0), []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(name.startswith(o + ".") for o in outer):
            continue
        if any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in mod.modules()):
            outer.append(name)
            if len(mod) > best[1]:
                best = (name, len(mod))
    return best


def _count(n: str, pct: str, L: int) -> int:
    return round(float(n) * L / 100) if pct else int(float(n))


def selected_blocks(patterns: tuple[str, ...], n_blocks: int) -> set[int]:
    """Block indices the first/last/share patterns select in a model of n_blocks blocks."""
    out: set[int] = set()
    for p in patterns:
        m = _BLOCK.match(p)
        if not m:
            continue
        kind, n, pct = m.groups()
        if kind == "share":
            k = max(1, round(float(n) * n_blocks / 100)) if n_blocks else 0
            head = k // 5
            out |= set(range(min(head, n_blocks))) | set(range(max(0, n_blocks - (k - head)), n_blocks))
        elif kind == "first":
            out |= set(range(min(_count(n, pct, n_blocks), n_blocks)))
        else:
            out |= set(range(max(0, n_blocks - _count(n, pct, n_blocks)), n_blocks))
    return out


def high_precision_names(model: nn.Module, patterns: tuple[str, ...]) -> set[str]:
    """Fully qualified names of the modules (any kind) the patterns select; a selected block selects every
    module under it."""
    check_patterns(patterns)
    if not patterns:
        return set()
    prefix, n = block_list(model)
    blocks = selected_blocks(patterns, n)
    globs = [p for p in patterns if not _BLOCK.match(p)]
    names = [fqn for fqn, _ in model.named_modules() if fqn]
    for g in globs:
        if not any(fnmatch.fnmatchcase(fqn, g) for fqn in names):
            raise ValueError(f"high-precision pattern {g!r} matches no module of this model{_did_you_mean(g, names)}; "
                             "use first:N, last:N, share:P% or a module-name glob such as *.attn.c_proj")
    out = set()
    for fqn, _ in model.named_modules():
        if any(fnmatch.fnmatchcase(fqn, g) for g in globs):
            out.add(fqn)
        rest = fqn[len(prefix) + 1:] if prefix and fqn.startswith(prefix + ".") else None
        if rest is not None and int(rest.split(".", 1)[0]) in blocks:
            out.add(fqn)
    return out


def _did_you_mean(pattern: str, names: list[str]) -> str:
    """" (did you mean X?)" for a misspelt block pattern (firts:1 -> first:1) or module name; "" when none is close."""
    head, sep, rest = pattern.partition(":")
    if sep:
        return did_you_mean(head, ("first", "last", "share")).replace("?)", f":{rest}?)")
    return did_you_mean(pattern, names)
