"""LinearSpec: what a recipe asks of one linear layer's three GeMMs, derived once per layer.

The three GeMMs of Y = X·Wᵀ (X: [M, K] tokens × in, W: [N, K] out × in, dY: [M, N]):

    forward      Y  = Q(X)  · Q(W)ᵀ        X, W quantized along K (per token / per out channel)
    input grad   dX = Q(dY) · Q(W)         dY, W quantized along N (W per in channel)
    weight grad  dW = Q(dYᵀ)· Q(Xᵀ)ᵀ       dYᵀ, Xᵀ quantized along M (tokens)

Q is always applied with the GeMM's reduction dim last (operands are transposed first). Granularities
whose groups do not depend on the layout ("tensor", square "block") are quantized once and the same
values reused by the transposed GeMM: the spec says which copy is reused. A dim that is not a multiple
of a tile/block size is zero-padded for the quantization (a zero changes no absmax and adds nothing to
a product), so any token count works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.quant import fake_quantize, fake_quantize_with_scales, scaled_values
from lowbit.recipes import DGE, OCC, Recipe, TensorQuant

OPERANDS = ("input", "weight", "grad_output")


def _tiled(q: TensorQuant | None) -> bool:
    """Groups of `q.block` along the reduction dim (tiles) or block × block squares."""
    return q is not None and q.granularity in ("tile", "block")


def _layout_free(q: TensorQuant | None) -> bool:
    """True when Q(xᵀ) == Q(x)ᵀ: one scale for the tensor, or square blocks."""
    return q is None or q.granularity in ("tensor", "block")


@dataclass(frozen=True)
class LinearSpec:
    """The recipe as one layer's autograd Function reads it (immutable).

    input, weight, grad_output: TensorQuant of each operand, None = kept in the compute dtype.
    occ, dge:      the recipe's OCC and DGE settings (occ_on / dge.enabled say whether they apply).
    delayed:       per-tensor scales from an amax history (LayerQuantState holds the histories).
    hadamard_size: size of the random Hadamard rotation of both dW operands along tokens, 0 = none.
    reuse_xq:      the forward's Q(X) is the dW GeMM's (layout-free, or recipe.wgrad_input "forward").
    reuse_wq:      the forward's Q(W) is the dX GeMM's (W quantized once per step).
    reuse_dyq:     the dX GeMM's Q(dY) is Q(dYᵀ)ᵀ of the dW GeMM.
    weight_in_axis: W is quantized once along N (per input channel) for both GeMMs (recipe.weight_scale_axis "in").
    exact_gemm:    recipe.gemm == "exact": dequantized operands stay fp32 (not rounded to bf16) in the GeMMs.
    hardware:      recipe.gemm == "hardware": the GeMMs run on FP8 codes (lowbit.nn.hardware).
    dgrad_weight:  W's quantizer in the dX GeMM when it is not `weight` (recipe.dgrad_weight), else None.
    wgrad_hp:      the dW GeMM runs on unquantized operands (recipe.wgrad_high_precision).
    scheme:        recipe.scheme: which autograd Function runs the layer (lowbit.nn.module.FUNCTIONS).
    rotation_size: scheme "quartet": the Hadamard order of its rotations (the input's tile size), else 0.
    uses_function: False when nothing is quantized and OCC is off: the layer is plain F.linear.
    """

    input: TensorQuant | None
    weight: TensorQuant | None
    grad_output: TensorQuant | None
    occ: OCC
    dge: DGE
    delayed: bool
    hadamard_size: int
    reuse_xq: bool
    reuse_wq: bool
    reuse_dyq: bool
    uses_function: bool
    weight_in_axis: bool = False
    exact_gemm: bool = False
    hardware: bool = False
    dgrad_weight: TensorQuant | None = None
    wgrad_hp: bool = False
    rotation_size: int = 0
    scheme: str = "lowbit"

    @property
    def occ_on(self) -> bool:
        return self.occ.enabled and self.occ.alpha < 1.0

    @classmethod
    def from_recipe(cls, r: Recipe) -> "LinearSpec":
        had = r.grad_output.hadamard_size if r.grad_output is not None and r.grad_output.hadamard else 0
        hp = r.wgrad_high_precision
        return cls(input=r.input, weight=r.weight, grad_output=r.grad_output, occ=r.occ, dge=r.dge,
                   delayed=r.scaling == "delayed", hadamard_size=0 if hp else had,
                   reuse_xq=r.input is not None and not had and not hp
                   and (_layout_free(r.input) or r.wgrad_input == "forward"),
                   reuse_wq=r.weight is not None and r.dgrad_weight is None
                   and (_layout_free(r.weight) or r.weight_scale_axis == "in"),
                   dgrad_weight=r.dgrad_weight, wgrad_hp=hp,
                   rotation_size=(r.input.block or 32) if r.scheme == "quartet" else 0, scheme=r.scheme,
                   weight_in_axis=r.weight is not None and r.weight_scale_axis == "in",
                   exact_gemm=r.gemm == "exact", hardware=r.gemm == "hardware",
                   reuse_dyq=_layout_free(r.grad_output) and not had and not hp,
                   uses_function=r.quantized or r.occ.enabled)

    def quantizers(self) -> dict[str, TensorQuant]:
        """{operand name: TensorQuant} of the quantized operands."""
        return {op: q for op in OPERANDS if (q := getattr(self, op)) is not None}

    def pad_multiple(self) -> int:
        """Token-dim multiple the Hadamard-rotated dW operands are padded to (rotation size and tiles)."""
        return math.lcm(self.hadamard_size, *(q.block for q in (self.grad_output, self.input) if _tiled(q)))


def check_layer(spec: LinearSpec, in_features: int, out_features: int) -> None:
    """ValueError when a layer of these widths cannot run `spec` (the checks that need a layer; the recipe's
    own are lowbit.recipes'): Quartet rotates runs of `rotation_size` along both widths."""
    n = spec.rotation_size
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if n and size % n:
            raise ValueError(f"scheme='quartet' rotates runs of {n} along {name}, but {name}={size} is not a "
                             f"multiple of {n}; choose widths divisible by {n} or another recipe")


def _pads(t: torch.Tensor, q: TensorQuant) -> tuple[int, int]:
    R, C = t.shape
    return ((-C) % q.block if _tiled(q) else 0), ((-R) % q.block if q.granularity == "block" else 0)


def fake_quantize_2d(t: torch.Tensor, q: TensorQuant | None, generator=None, amax=None,
                     with_scales: bool = False, transposed: bool = False):
    """fake_quantize of a 2-D tensor [R, C] along its last dim, zero-padding the last dim (tile, block) and
    the rows (block) up to a multiple of q.block first; same shape and dtype. None passes t through.
    with_scales: return (values, the decode scales, or None when t was padded) instead. transposed: t stands for
    the operand t.t(), and the values come back in t's layout (quant.fake_quantize_with_scales)."""
    if q is None:
        return (t, None) if with_scales else t
    if transposed:
        if any(_pads(t.t(), q)):
            res = fake_quantize_2d(t.t(), q, generator, amax, with_scales)
            return (res[0].t(), res[1]) if with_scales else res.t()
        res = fake_quantize_with_scales(t, q, generator, amax, transposed=True)
        return res if with_scales else res[0]
    pc, pr = _pads(t, q)
    if pc or pr:
        R, C = t.shape
        out = fake_quantize(F.pad(t, (0, pc, 0, pr)), q, generator, amax)[:R, :C]
        return (out, None) if with_scales else out
    if with_scales:
        return fake_quantize_with_scales(t, q, generator, amax)
    return fake_quantize(t, q, generator, amax)


def scaled_values_2d(t: torch.Tensor, q: TensorQuant, amax=None) -> torch.Tensor:
    """t [R, C] divided by its quantization scale (fp32, t's shape), padded like fake_quantize_2d."""
    return scaled_and_scales_2d(t, q, amax)[0]


def scaled_and_scales_2d(t: torch.Tensor, q: TensorQuant, amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale as fp32 [R, C], the decode scales of the padded tensor), padded like fake_quantize_2d."""
    pc, pr = _pads(t, q)
    if pc or pr:
        R, C = t.shape
        xs, sc = scaled_values(F.pad(t, (0, pc, 0, pr)), q, amax=amax)
        return xs[:R, :C], sc
    return scaled_values(t, q, amax=amax)
