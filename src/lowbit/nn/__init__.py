"""Quantized linear layers and `convert`, torchao-style.

    import lowbit
    lowbit.convert(model, "fp4-paper")     # nn.Linear -> QLinear in place (lm_head stays high precision)

Every module and what it owns: docs/architecture.md.
"""
from lowbit.nn.convert import (
    check_block_sizes,
    collect_stats,
    convert,
    qlinears,
    quant_stats,
    swap_modules,
)
from lowbit.nn.function import QLinearFunction
from lowbit.nn.hadamard import hadamard_matrix, random_hadamard
from lowbit.nn.module import QConv1D, QLinear
from lowbit.nn.spec import LinearSpec, fake_quantize_2d, scaled_values_2d
from lowbit.nn.state import LayerQuantState

__all__ = ["QLinear", "QConv1D", "LinearSpec", "LayerQuantState", "QLinearFunction", "convert", "swap_modules",
           "qlinears", "collect_stats", "quant_stats", "check_block_sizes", "fake_quantize_2d", "scaled_values_2d",
           "hadamard_matrix", "random_hadamard"]

