"""Packages whose public names live in submodules, imported on first use (PEP 562), so that importing the
package (e.g. for the CLI's parser) does not import torch and the training stack."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, names: dict[str, str]):
    """(__getattr__, __dir__) for `package`: `names` maps each public name to the submodule defining it (relative to
    `package`, or absolute when it starts with "lowbit.")."""

    def __getattr__(name: str):
        if name in names:
            module = names[name] if names[name].startswith("lowbit.") else f"{package}.{names[name]}"
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
