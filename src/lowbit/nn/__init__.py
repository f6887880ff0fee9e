"""Quantized linear layers and `convert`, torchao-style.

    import lowbit
    lowbit.convert(model, "fp4-paper")     # nn.Linear -> QLinear in place (lm_head stays high precision)

Where things are:
    spec.py      LinearSpec: the recipe as one layer reads it (frozen); fake_quantize_2d (padding)
    state.py     LayerQuantState: the one mutable per-layer object (amax histories, generators, statistics)
    function.py  the autograd Function (reads the spec, writes only the state) and the OCC residual GeMMs
    module.py    QLinear, QConv1D (bias inside the Function: one rounding, see function.py)
    convert.py   convert, collect_stats / quant_stats, check_block_sizes
    hadamard.py  random block-Hadamard rotations
CPU bf16 GeMM emulation lives in lowbit.cpu_bf16 and the torch.compile wrapper in lowbit.train.compile.
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

