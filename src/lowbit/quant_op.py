"""The round-to-nearest quantizer as one opaque custom op, `lowbit::quantize`, for torch.compile.

Under torch.compile lowbit.quant calls this op instead of its chain of elementwise torch ops: compiled code then
runs the same fused kernels as eager (C on CPUs, Triton on CUDA) and fuses around them, and cannot round
differently from eager. The fake implementation gives shapes and dtypes only. Stochastic rounding from a layer's
lowbit.rng.Stream goes through the op too: the graph passes the layer's call index and the stream's derivation,
and the op derives the keys (in Python integers, or eager tensor ops on a GPU) and draws exactly as eager does;
no integer arithmetic reaches generated code (inductor 2.13 miscompiled some). lowbit.quant registers its `_run` here (no import cycle).
"""
from __future__ import annotations

import logging

import torch

from lowbit.groups import scale_shape
from lowbit.rng import Stream
from lowbit.tensor_quant import TensorQuant


def register_quantize_op(run):
    """torch.ops.lowbit.quantize around run(x, q, generator, amax, dequant, transposed) -> (out, scales), or None (with one
    warning) where this torch's custom_op cannot take its signature: compiled code then traces the eager code.
    call, layer, path: stochastic rounding's stream, lowbit.rng.Stream(layer=layer, call=call, path=path) (call: a
    0-d int64 tensor, the layer's call index; None for round-to-nearest). transposed: x is a 2-D b standing for
    the operand b.t(); the values come back in b's layout (contiguous, no copy), the scales are b.t()'s."""
    def impl(x: torch.Tensor, fmt: str, granularity: str, block: int, scale_fmt: str, scale_round: str,
             reciprocal: bool, scale_rule: str, scale_mult: float, amax: torch.Tensor | None, dequant: bool,
             rounding: str, four_over_six: bool, call: torch.Tensor | None, layer: int,
             path: list[int], transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q = TensorQuant(fmt, granularity, block, scale_fmt, rounding=rounding, scale_round=scale_round,
                        reciprocal=reciprocal, four_over_six=four_over_six, scale_rule=scale_rule,
                        scale_mult=scale_mult)
        gen = None if call is None else Stream(layer=layer, call=call, path=tuple(path))
        out, scales = run(x, q, gen, amax, dequant, transposed)
        return out.contiguous(), scales.contiguous().clone()  # fresh, contiguous: what the fake promises

    def fake(x, fmt, granularity, block, scale_fmt, scale_round, reciprocal, scale_rule, scale_mult, amax, dequant,
             rounding, four_over_six, call, layer, path, transposed):
        q = TensorQuant(fmt, granularity, block, scale_fmt)
        logical = (x.shape[1], x.shape[0]) if transposed else x.shape  # transposed: x = b stands for b.t()
        return (x.new_empty(x.shape, dtype=x.dtype if dequant else torch.float32),
                x.new_empty(scale_shape(logical, q), dtype=torch.float32))

    try:
        op = torch.library.custom_op("lowbit::quantize", mutates_args=())(impl)
        op.register_fake(fake)
        return op
    except Exception as e:  # noqa: BLE001 -- a torch whose custom_op cannot take this signature: trace instead
        logging.getLogger("lowbit").warning("torch.compile will trace the eager quantizers (the custom op could not "
                                            "be registered with torch %s: %s)", torch.__version__, e)
        return None
