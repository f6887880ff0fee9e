"""Named training recipes: which tensors of each linear layer's three GeMMs are
quantized, to which format, at which granularity.

A recipe is data (a frozen dataclass), not a code path: QLinear reads it and the
trainer reads `compute_dtype`. Recipes round-trip through TOML.

The three GeMMs of a linear layer Y = X·Wᵀ (X: [M, K] tokens × in-features,
W: [N, K] out × in, dY: [M, N]):
    forward      Y  = X  · Wᵀ    reduction over K: quantize `input` and `weight`
    input grad   dX = dY · W     reduction over N: quantize `grad_output` and `weight`
    weight grad  dW = dYᵀ· X     reduction over M: quantize `grad_output` and `input`
Every scale is taken along the reduction dimension of the GeMM it feeds, so
"row" granularity means per token for activations and per output channel for
the forward weight, as in the FP4 paper.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lowbit._io import to_toml
from lowbit.layer_patterns import normalize_patterns
from lowbit.suggest import did_you_mean
from lowbit.tensor_quant import DGE, OCC, QUANT_FORMATS, TensorQuant, check_choice

__all__ = ["Recipe", "TensorQuant", "DGE", "OCC", "QUANT_FORMATS", "register", "names", "get", "load", "save"]

# "lowbit": every GeMM quantizes its operands from the high-precision tensors. "quartet" (Castro et al. 2025):
# the forward rotates X and W by a 32-point Hadamard along K before quantizing; the backward is the
# straight-through estimator masked where the forward clipped, and its GeMMs requantize the forward's
# quantized operands and dY after a fresh random-sign Hadamard along their own reduction dims.
SCHEMES = ("lowbit", "quartet")
COMPUTE_DTYPES = ("fp32", "bf16")
SCALINGS = ("current", "delayed")
# "out": the forward weight is scaled per output channel (along K, the axis a real FP4 GeMM applies after its
# accumulation) and requantized per input channel for dX; "in": scaled once per input channel (along N) and
# reused by both GeMMs, as the FP4 paper's simulation does.
WEIGHT_SCALE_AXES = ("out", "in")
# The Q(X) of the weight-gradient GeMM dW = dYᵀ·X (for row/tile inputs; tensor and block Q(X) are layout-free and
# always reused): "requantize" quantizes X along tokens, dW's reduction dim, the axis a real FP4/FP8 GeMM can
# scale; "forward" reuses the forward's Q(X), scaled along K, as every branch of the FP4 paper's code does (its
# scales then sit inside dW's reduction: a simulation only, no low-precision GeMM can apply them).
WGRAD_INPUTS = ("requantize", "forward")
# Delayed scaling, as Transformer Engine's DelayedScaling: the amax a scale comes from is the history's "max" or
# its "most_recent" entry, times 2^margin (headroom against growth between steps).
AMAX_COMPUTE_ALGOS = ("max", "most_recent")
# "rounded": under bf16 compute the dequantized operands are bf16 tensors (one more rounding than hardware, which
# multiplies the codes exactly and applies the scales in fp32); "exact": they stay fp32 (fp32 accumulation),
# only the output is rounded to the compute dtype.
GEMM_MODES = ("rounded", "exact", "hardware")


@dataclass(frozen=True)
class Recipe:
    """A named low-precision training recipe. `None` for an operand means it is
    not quantized (kept in the compute dtype).

    Per-GeMM exceptions (torchao's cast_config_*_for_grad_*): `dgrad_weight` quantizes W in the input-
    gradient GeMM dX = dY·W differently from the forward (None: as `weight`); `wgrad_high_precision` runs
    the weight-gradient GeMM dW = dYᵀ·X on unquantized operands in the compute dtype.
    `high_precision`: layers kept out of quantization (patterns: lowbit.nn.select)."""

    name: str
    description: str = ""
    compute_dtype: str = "fp32"
    input: TensorQuant | None = None
    weight: TensorQuant | None = None
    grad_output: TensorQuant | None = None
    dge: DGE = field(default_factory=DGE)
    occ: OCC = field(default_factory=OCC)
    scaling: str = "current"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    margin: int = 0
    quantize_head: bool = False
    weight_scale_axis: str = "out"
    gemm: str = "rounded"
    dgrad_weight: TensorQuant | None = None
    wgrad_high_precision: bool = False
    high_precision: tuple[str, ...] = ()
    scheme: str = "lowbit"
    wgrad_input: str = "requantize"

    def __post_init__(self):
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("weight_scale_axis", self.weight_scale_axis, WEIGHT_SCALE_AXES)
        check_choice("gemm", self.gemm, GEMM_MODES)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("scaling", self.scaling, SCALINGS)
        check_choice("amax_compute_algo", self.amax_compute_algo, AMAX_COMPUTE_ALGOS)
        check_choice("wgrad_input", self.wgrad_input, WGRAD_INPUTS)
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an integer >= 0 (scales get 2^margin headroom), got {self.margin!r}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        object.__setattr__(self, "high_precision", normalize_patterns(self.high_precision))
        problems = _conflicts(self)
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    @property
    def quantized(self) -> bool:
        return any(q is not None for q in (self.input, self.weight, self.grad_output))

    def replace(self, **changes) -> "Recipe":
        """A copy with fields changed; nested fields by dotted name, e.g.
        `recipe.replace(**{"dge.k": 3, "occ.alpha": 0.999})`."""
        top, nested = {}, {}
        for key, value in changes.items():
            head, _, rest = key.partition(".")
            if head not in {f.name for f in dataclasses.fields(self)}:
                raise ValueError(f"unknown recipe field {head!r}; fields are {_field_names(self)}")
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                top[head] = value
        for head, sub in nested.items():
            cur = top.get(head, getattr(self, head))
            if cur is None:
                raise ValueError(f"cannot set {head}.{'/'.join(sub)}: recipe {self.name!r} does not quantize {head}")
            bad = set(sub) - {f.name for f in dataclasses.fields(cur)}
            if bad:
                raise ValueError(f"unknown field(s) {sorted(bad)} of {head}; fields are {_field_names(cur)}")
            top[head] = dataclasses.replace(cur, **sub)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict:
        d = _drop_none(dataclasses.asdict(self))
        d["high_precision"] = list(self.high_precision)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        bad = set(d) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ValueError(f"unknown recipe field(s) {sorted(bad)}; fields are {_field_names(cls)}")
        if "name" not in d:
            raise ValueError("a recipe needs a 'name'")
        for key, sub in (("input", TensorQuant), ("weight", TensorQuant), ("grad_output", TensorQuant),
                         ("dgrad_weight", TensorQuant), ("dge", DGE), ("occ", OCC)):
            if key in d and d[key] is not None:
                if not isinstance(d[key], dict):
                    raise ValueError(f"recipe field {key!r} must be a table, got {d[key]!r}")
                bad = set(d[key]) - {f.name for f in dataclasses.fields(sub)}
                if bad:
                    raise ValueError(f"unknown field(s) {sorted(bad)} in [{key}]; fields are {_field_names(sub)}")
                d[key] = sub(**d[key])
        return cls(**d)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"invalid recipe TOML: {e}") from None
        return cls.from_dict(data)


def _conflicts(r: Recipe) -> list[str]:
    """What in `r` contradicts itself, each with the fix (empty when it is consistent). Every check that needs
    only the recipe lives here; the ones that need a layer's widths are lowbit.nn.spec.check_layer's."""
    hadamard = r.grad_output is not None and r.grad_output.hadamard
    rules = [
        (r.dgrad_weight is not None and r.weight is None,
         "dgrad_weight is set but weight is not quantized; set weight or drop dgrad_weight"),
        (r.scaling == "delayed" and any(q is not None and q.granularity != "tensor"
                                        for q in (r.input, r.weight, r.grad_output)),
         "scaling='delayed' is only defined for granularity='tensor'; use scaling='current'"),
        (r.dge.enabled and r.weight is None, "DGE is enabled but the weight is not quantized; set weight or "
         "disable dge"),
        (r.scheme == "quartet" and not (r.input and r.weight and r.grad_output),
         "scheme='quartet' quantizes input, weight and grad_output; set all three"),
        (r.scheme == "quartet" and (r.dge.enabled or r.occ.enabled or r.scaling == "delayed" or r.dgrad_weight
                                    or r.wgrad_high_precision or r.weight_scale_axis == "in"
                                    or r.wgrad_input != "requantize"),
         "scheme='quartet' has its own backward; it takes no DGE, OCC, delayed scaling, dgrad_weight, "
         "wgrad_high_precision, weight_scale_axis='in' or wgrad_input='forward'"),
        (r.scaling == "delayed" and r.dgrad_weight is not None,
         "delayed scaling with dgrad_weight is not supported (one amax history per operand); use "
         "scaling='current' or drop dgrad_weight"),
        (r.weight_scale_axis == "in" and r.dgrad_weight is not None,
         "weight_scale_axis='in' reuses the forward W in dX, which contradicts dgrad_weight; drop one of them"),
        (r.scaling == "delayed" and hadamard, "delayed scaling with the Hadamard transform is not supported (the "
         "rotated operands have no amax history); use scaling='current'"),
        (r.wgrad_input == "forward" and (hadamard or r.wgrad_high_precision),
         "wgrad_input='forward' reuses the forward's Q(X) in dW, which the Hadamard transform or "
         "wgrad_high_precision replace; drop one of them"),
    ]
    problem = hardware_problem(r) if r.gemm == "hardware" else None
    return [msg for bad, msg in rules if bad] + ([problem] if problem else [])


def hardware_problem(r: "Recipe") -> str | None:
    """Why `r` cannot run gemm='hardware' (FP8 codes through torch._scaled_mm, lowbit.nn.hardware), or None."""
    ops = {"input": r.input, "weight": r.weight, "grad_output": r.grad_output, "dgrad_weight": r.dgrad_weight}
    for name, q in ops.items():
        if q is None and name != "dgrad_weight":
            return f"gemm='hardware' needs every GeMM operand in FP8, but {name} is not quantized"
        blocked = q is not None and q.granularity in ("tile", "block") and q.block == 128 and q.fmt == "e4m3"
        if q is not None and not (q.fmt in ("e4m3", "e5m2") and (q.granularity in ("tensor", "row") or blocked)
                                  and q.rounding == "nearest" and not q.hadamard and not q.four_over_six):
            return (f"gemm='hardware' runs FP8 GeMMs with per-tensor, per-row or E4M3 1x128/128x128 block scales "
                    f"(torch._scaled_mm); {name} is {q.fmt}/{q.granularity}"
                    f"{q.block if q.granularity in ('tile', 'block') else ''}/{q.rounding}: use gemm='rounded' to "
                    "simulate this recipe")
    if r.scheme != "lowbit" or r.occ.enabled or r.dge.enabled or r.weight_scale_axis == "in" \
            or r.wgrad_input == "forward":
        return ("gemm='hardware' takes no OCC, DGE, scheme='quartet', weight_scale_axis='in' or "
                "wgrad_input='forward' yet; use gemm='rounded' to simulate this recipe")
    return None


def _field_names(obj) -> str:
    return ", ".join(f.name for f in dataclasses.fields(obj))


def _drop_none(d: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


# --- the registry --------------------------------------------------------------------------

def _fp4(fmt="e2m1"):
    return TensorQuant(fmt=fmt, granularity="row")


def _mx(fmt, scale_round="floor"):
    return TensorQuant(fmt, "tile", 32, "e8m0", scale_round=scale_round)


_E4M3_T = TensorQuant(fmt="e4m3", granularity="tensor")
_E4M3_ROW = TensorQuant("e4m3", "row", scale_fmt="e8m0", scale_round="ceil")
_NV_TILE = TensorQuant("e2m1", "tile", 16, "e4m3")
_QUEST = TensorQuant("e2m1", "tile", 32, "e8m0", scale_rule="quest")
_E5M2_T = TensorQuant(fmt="e5m2", granularity="tensor")

_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (replacing one of the same name)."""
    _RECIPES[recipe.name] = recipe
    return recipe


for _r in (
    Recipe("fp32", "FP32 reference: no quantization, no autocast", compute_dtype="fp32"),
    Recipe("bf16", "BF16 autocast reference: no quantization", compute_dtype="bf16"),
    Recipe("fp8-tensor", "FP8 per-tensor current scaling: E4M3 activations/weights, E5M2 gradients",
           compute_dtype="bf16", input=_E4M3_T, weight=_E4M3_T, grad_output=_E5M2_T),
    Recipe("fp8-tensor-delayed", "FP8 per-tensor delayed scaling (amax history of 16), E4M3/E5M2",
           compute_dtype="bf16", input=_E4M3_T, weight=_E4M3_T, grad_output=_E5M2_T, scaling="delayed"),
    Recipe("fp8-block", "DeepSeek-V3 FP8: E4M3 everywhere, 1x128 activation/gradient tiles, 128x128 weight blocks",
           compute_dtype="bf16",
           input=TensorQuant("e4m3", "tile", 128), weight=TensorQuant("e4m3", "block", 128),
           grad_output=TensorQuant("e4m3", "tile", 128)),
    Recipe("fp4-direct", "FP4 (E2M1) direct casting, vector-wise absmax scaling, no DGE, no OCC (paper ablation)",
           compute_dtype="bf16", input=_fp4(), weight=_fp4(), grad_output=_fp4()),
    Recipe("fp4-paper", "Wang et al. 2025 as their code runs it: E2M1 activations/weights with DGE (k=5) and "
           "per-token OCC (alpha=0.99); output gradients E5M2, per-tensor scale", compute_dtype="bf16",
           input=_fp4(), weight=_fp4(), grad_output=_E5M2_T, dge=DGE(enabled=True),
           occ=OCC(enabled=True, granularity="token")),
    Recipe("fp4-paper-allfp4", "Wang et al. 2025 read as all-FP4: E2M1 output gradients too (per token row), OCC "
           "quantiles over the whole tensor (lowbit's fp4-paper before it followed the authors' code)",
           compute_dtype="bf16", input=_fp4(), weight=_fp4(), grad_output=_fp4(), dge=DGE(enabled=True),
           occ=OCC(enabled=True)),
    Recipe("fp8-rowwise", "torchao rowwise FP8: E4M3 everywhere, one power-of-two scale per row along each "
           "GeMM's reduction dim (scales rounded up: 2^ceil(log2(amax/448)))", compute_dtype="bf16",
           input=_E4M3_ROW, weight=_E4M3_ROW, grad_output=_E4M3_ROW),
    Recipe("fp8-rowwise-gw-hp", "torchao rowwise_with_gw_hp: rowwise E4M3 forward and dY, tensorwise E4M3 W in "
           "dX, the weight-gradient GeMM in BF16", compute_dtype="bf16",
           input=_E4M3_ROW, weight=_E4M3_ROW, grad_output=_E4M3_ROW,
           dgrad_weight=TensorQuant("e4m3", "tensor", scale_fmt="e8m0", scale_round="ceil"),
           wgrad_high_precision=True),
    Recipe("mxfp8", "OCP MXFP8: E4M3 in 1x32 tiles with E8M0 scales rounded down (OCP, torchao's default)",
           compute_dtype="bf16", input=_mx("e4m3"), weight=_mx("e4m3"), grad_output=_mx("e4m3")),
    Recipe("mxfp8-rceil", "MXFP8 with E8M0 scales rounded up (RCEIL: Transformer Engine, cuBLAS, torchao "
           "RCEIL): nothing saturates", compute_dtype="bf16",
           input=_mx("e4m3", "ceil"), weight=_mx("e4m3", "ceil"), grad_output=_mx("e4m3", "ceil")),
    Recipe("mxfp4", "OCP MXFP4: E2M1 in 1x32 tiles with power-of-two (E8M0) shared scales",
           compute_dtype="bf16", input=_mx("e2m1"), weight=_mx("e2m1"), grad_output=_mx("e2m1")),
    Recipe("nvfp4", "NVIDIA's NVFP4 recipe (arXiv 2509.25149, TE NVFP4BlockScaling): E2M1, E4M3 x FP32 scales; "
           "1x16 activations/gradients, 16x16 weight blocks, 16-point RHT on the weight-gradient GeMM, stochastic "
           "rounding of gradients, 16% of the blocks in BF16 (share:16%, weighted to the last)",
           compute_dtype="bf16", input=_NV_TILE, weight=TensorQuant("e2m1", "block", 16, "e4m3"),
           grad_output=TensorQuant("e2m1", "tile", 16, "e4m3", rounding="stochastic", hadamard=True),
           high_precision=("share:16%",)),
    Recipe("nvfp4-4over6", "nvfp4 with Four Over Six block scales (each 1x16 tile and 16x16 block scaled to 4 or "
           "6, whichever has the smaller error)", compute_dtype="bf16",
           input=dataclasses.replace(_NV_TILE, four_over_six=True),
           weight=TensorQuant("e2m1", "block", 16, "e4m3", four_over_six=True),
           grad_output=TensorQuant("e2m1", "tile", 16, "e4m3", rounding="stochastic", hadamard=True,
                                   four_over_six=True),
           high_precision=("share:16%",)),
    Recipe("quartet", "Quartet (Castro et al. 2025): MXFP4 forward on 32-point Hadamard-rotated X and W with QuEST "
           "scales and trust masks; backward GeMMs on fresh random-sign rotations with stochastic rounding",
           compute_dtype="bf16", scheme="quartet",
           input=_QUEST, weight=_QUEST,
           grad_output=TensorQuant("e2m1", "tile", 32, "e8m0", rounding="stochastic", scale_mult=4 / 3)),
    Recipe("nvfp4-tiles", "NVFP4 numerics everywhere: 1x16 tiles on every operand (weights too), every block "
           "quantized (lowbit's nvfp4 before it followed NVIDIA's recipe)", compute_dtype="bf16",
           input=_NV_TILE, weight=_NV_TILE,
           grad_output=TensorQuant("e2m1", "tile", 16, "e4m3", rounding="stochastic", hadamard=True)),
):
    register(_r)


def names() -> list[str]:
    return list(_RECIPES)


def get(recipe: "str | Recipe | Path") -> Recipe:
    """Look up a recipe by name, or load one from a `.toml` file path; a Recipe passes through. "NAME@MODE" is
    recipe NAME with gemm = MODE (e.g. "fp8-tensor@hardware": its GeMMs on real FP8 codes)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith(".toml")):
        return load(recipe)
    if isinstance(recipe, str) and "@" in recipe:
        base, mode = recipe.rsplit("@", 1)
        check_choice("gemm (after @)", mode, GEMM_MODES)
        return dataclasses.replace(get(base), gemm=mode, name=recipe)
    if recipe not in _RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}{did_you_mean(recipe, _RECIPES)}; known recipes: "
                         f"{', '.join(_RECIPES)} (or pass a path to a .toml recipe file)")
    return _RECIPES[recipe]


def load(path: "str | Path") -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        return Recipe.from_toml(path.read_text())
    except (ValueError, TypeError) as e:
        raise ValueError(f"recipe file {path}: {e}") from None


def save(recipe: Recipe, path: "str | Path") -> None:
    Path(path).write_text(recipe.to_toml())
