"""The grammar of high-precision layer selections (`Recipe.high_precision`; applied by lowbit.nn.select):
`first:N`, `last:N` (N a count or a share like 12.5%), `share:P%`; anything else is a module-name glob."""
from __future__ import annotations

import re

HIGH_PRECISION_BLOCK = re.compile(r"^(first|last|share):(\d+(?:\.\d+)?)(%?)$")


def check_patterns(patterns: tuple[str, ...]) -> None:
    """ValueError naming a malformed high-precision pattern and the grammar (lowbit.nn.select)."""
    for p in patterns:
        m = HIGH_PRECISION_BLOCK.match(p)
        if p.split(":", 1)[0] in ("first", "last", "share") and not m:
            raise ValueError(f"bad high_precision pattern {p!r}: use first:N, last:N (N a count or a share like "
                             "12.5%), share:P% or a module-name glob such as *.attn.c_proj")
        if m and m.group(1) == "share" and not m.group(3):
            raise ValueError(f"bad high_precision pattern {p!r}: share takes a percentage, e.g. share:16%")
        if m and m.group(3) and float(m.group(2)) > 100:
            raise ValueError(f"bad high_precision pattern {p!r}: a share is at most 100%")


def normalize_patterns(value) -> tuple[str, ...]:
    """A selection as a tuple of checked patterns, from a tuple/list of strings or one comma-separated string."""
    if isinstance(value, (list, tuple, str)):
        items = [value] if isinstance(value, str) else list(value)
        if all(isinstance(p, str) for p in items):
            out = tuple(p.strip() for p in ",".join(items).split(",") if p.strip())
            check_patterns(out)
            return out
    raise ValueError(f"high_precision must be a list of patterns (strings), got {value!r}")
