"""How one GeMM operand is quantized (TensorQuant) and the paper's two estimators' settings (DGE, OCC):
frozen dataclasses that check their own fields. A Recipe (lowbit.recipes) holds one per operand."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.suggest import did_you_mean

GRANULARITIES = ("tensor", "row", "tile", "block")
SCALE_FORMATS = ("fp32", "e4m3", "e8m0")
ROUNDINGS = ("nearest", "stochastic")
SCALE_ROUNDS = ("floor", "ceil")
SCALE_RULES = ("absmax", "quest")
OCC_GRANULARITIES = ("token", "tensor")
# Number formats a tensor may be quantized to (names understood by lowbit.formats).
QUANT_FORMATS = ("e2m1", "e1m2", "e3m0", "e4m3", "e5m2")


@dataclass(frozen=True)
class TensorQuant:
    """How one GeMM operand is quantized.

    fmt:         element format ("e2m1", "e4m3", ...).
    granularity: "tensor" (one scale), "row" (one scale per vector along the
                 reduction dim), "tile" (1×block along the reduction dim) or
                 "block" (block×block).
    block:       tile/block size; ignored for "tensor" and "row".
    scale_fmt:   "fp32", "e4m3" (NVFP4: E4M3 block scale × FP32 tensor scale) or
                 "e8m0" (MX: power-of-two scale).
    rounding:    "nearest" (ties to even) or "stochastic".
    scale_round: power-of-two ("e8m0") scales: "floor" (OCP MX: 2^(floor(log2 amax) − emax_elem), the
                 top values may saturate) or "ceil" (2^ceil(log2(amax/max)): torchao's RCEIL, TE's
                 MXFP8, DeepSeek's UE8M0; nothing saturates).
    reciprocal:  multiply by the reciprocal scale computed as Transformer Engine and torchao do
                 (e = max/amax) instead of dividing by amax/max: flips exact ties only; see lowbit.scales.
    four_over_six: (scale_fmt "e4m3") per group, keep whichever of "max to 6" and "max to 4" (the block
                 scale ×1.5) has the smaller squared error; the tensor scale maps to 256, not 448
                 (Cook et al. 2025, "Four Over Six"; TE's NVFP4 4over6).
    scale_rule:  "absmax" (the group's absmax maps to the format's max) or "quest" (QuEST, Panferov et al.
                 2025, as Quartet's code: s = 2^floor(log2(2.92247856/6 · std(group) + 1e-8)), the MSE-optimal
                 Gaussian clip; values beyond ±max·s are clipped; with scale_fmt "e8m0" only).
    scale_mult:  the decode scale times this after its rule (Quartet's backward: 4/3, so the scaled absmax
                 lies in [3, 6) and stochastic rounding never clips).
    hadamard:    (on `grad_output` only) apply a random block-Hadamard transform of size
                 `hadamard_size` along the token dim to both operands of the weight-gradient
                 GeMM dW = dYᵀ·X before quantizing them (NVFP4's RHT; exact in real
                 arithmetic since Hᵀ·H = I, it spreads outliers across each block).
    """

    fmt: str = "e2m1"
    granularity: str = "row"
    block: int = 0
    scale_fmt: str = "fp32"
    rounding: str = "nearest"
    hadamard: bool = False
    hadamard_size: int = 16
    scale_round: str = "floor"
    reciprocal: bool = False
    four_over_six: bool = False
    scale_rule: str = "absmax"
    scale_mult: float = 1.0

    def __post_init__(self):
        check_choice("scale_rule", self.scale_rule, SCALE_RULES)
        if self.scale_rule == "quest" and (self.scale_fmt != "e8m0" or self.granularity == "block"):
            raise ValueError(f"scale_rule='quest' makes power-of-two scales over rows or tiles; set "
                             f"scale_fmt='e8m0' and granularity 'tile'/'row'/'tensor' (got {self.scale_fmt!r}, "
                             f"{self.granularity!r})")
        if not (isinstance(self.scale_mult, (int, float)) and 0 < self.scale_mult < float("inf")):
            raise ValueError(f"scale_mult must be a positive finite number, got {self.scale_mult!r}")
        check_choice("fmt", self.fmt, QUANT_FORMATS)
        check_choice("scale_round", self.scale_round, SCALE_ROUNDS)
        if self.four_over_six and (self.scale_fmt != "e4m3" or self.fmt != "e2m1"):
            raise ValueError("four_over_six needs fmt='e2m1' with scale_fmt='e4m3' (NVFP4); "
                             f"got fmt={self.fmt!r}, scale_fmt={self.scale_fmt!r}")
        if self.four_over_six and self.reciprocal:
            raise ValueError("four_over_six has no reciprocal (TE-convention) variant; set reciprocal=false")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("scale_fmt", self.scale_fmt, SCALE_FORMATS)
        check_choice("rounding", self.rounding, ROUNDINGS)
        if self.granularity in ("tile", "block") and self.block <= 0:
            raise ValueError(
                f"granularity={self.granularity!r} needs a positive block size, got block={self.block}; "
                "set e.g. block=128"
            )
        if self.hadamard and (self.hadamard_size <= 0 or self.hadamard_size & (self.hadamard_size - 1)):
            raise ValueError(f"hadamard_size must be a power of two, got {self.hadamard_size}")


@dataclass(frozen=True)
class DGE:
    """Differentiable gradient estimator for weights (Wang et al. 2025, Eq. 8):
    the weight gradient is multiplied by f'(x) = (1/k)·|2x/δ − 1|^(1/k − 1),
    clamped at `clamp`, evaluated on the scaled weight."""

    enabled: bool = False
    k: float = 5.0
    clamp: float = 3.0

    def __post_init__(self):
        if self.k <= 0:
            raise ValueError(f"dge.k must be > 0, got {self.k}")
        if self.clamp <= 0:
            raise ValueError(f"dge.clamp must be > 0, got {self.clamp}")


@dataclass(frozen=True)
class OCC:
    """Outlier clamping and compensation for activations: clamp to the
    [1−alpha, alpha] quantiles before quantizing; if `compensate`, add the
    sparse residual product ΔX·Wᵀ computed in high precision.
    granularity: "token" (each token's vector at its own quantiles, sorted[int(q·K)]: the
    authors' code) or "tensor" (one pair of quantiles over the whole activation tensor)."""

    enabled: bool = False
    alpha: float = 0.99
    compensate: bool = True
    granularity: str = "tensor"

    def __post_init__(self):
        if not 0.5 < self.alpha <= 1.0:
            raise ValueError(f"occ.alpha must be in (0.5, 1], got {self.alpha}")
        check_choice("occ.granularity", self.granularity, OCC_GRANULARITIES)


def check_choice(name: str, value, allowed) -> None:
    """ValueError naming the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}")
