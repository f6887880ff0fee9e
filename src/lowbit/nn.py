"""QLinear: an nn.Linear whose three GeMMs run under a lowbit recipe, and `convert`.

The three GeMMs of Y = X·Wᵀ + b (X: [M, K] tokens × in, W: [N, K] out × in, dY: [M, N]):

    forward      Y  = Q(X)  · Q(W)ᵀ        X, W quantized along K (per token / per out channel)
    input grad   dX = Q(dY) · Q(W)         dY, W quantized along N (W per in channel)
    weight grad  dW = Q(dYᵀ)· Q(Xᵀ)ᵀ       dYᵀ, Xᵀ quantized along M (tokens)

Q is `lowbit.quant.fake_quantize` with the recipe's TensorQuant for that operand
(`input`, `weight`, `grad_output`; None = not quantized) and is always applied with
the GeMM's reduction dim last (operands are transposed first). Granularities whose
groups do not depend on the layout ("tensor", square "block") are quantized once and
the same values reused for the transposed GeMM. A dim that is not a multiple of a
tile/block size is zero-padded for the quantization (a zero changes no absmax and
adds nothing to a product), so any token count works.

Recipe pieces (lowbit.recipes):
  * compute dtype: under torch.autocast the operands are cast to the autocast dtype
    before quantizing and every GeMM runs in it (as nn.Linear does); otherwise in the
    input's dtype. On CPU a bf16/fp16 GeMM runs as the fp32 GeMM of the upcast operands,
    rounded to the compute dtype (same numbers as fp32 accumulation, far faster on CPUs
    without native bf16 matmul; see _linear). Master weights and bias stay as they are (fp32); gradients come
    back in the parameters' / input's dtypes.
  * DGE (recipe.dge.enabled): dW ← dW ⊙ f'(W_scaled), f' from `lowbit.estimators.dge_derivative`
    on the forward weight divided by its scale (same scale as the forward GeMM used).
  * OCC (recipe.occ.enabled): X is clamped to its [1−α, α] quantiles before quantizing;
    with `compensate` the residual product ΔX·Wᵀ is added to Y, from ΔX and W in the compute
    dtype (not quantized) with fp32 accumulation (sparse CSR on CPU; dense elsewhere). The
    weight-gradient GeMM uses the *same* clamped activation (quantized along tokens) plus
    the matching compensation dYᵀ·ΔX (same precision), so dW is the exact gradient of the
    compensated forward (the paper's reference code likewise reuses its compensated
    forward activation in the dW GeMM). dX is the straight-through Q(dY)·Q(W).
  * grad_output.hadamard: a ±1-signed block-Hadamard rotation R (R·Rᵀ = I) of size
    hadamard_size along the token dim of both dW operands, dYᵀR and XᵀR, before
    quantizing them; the signs are drawn once per layer from a seed fixed by layer_idx.
  * stochastic rounding: from a torch.Generator owned by the layer, seeded from layer_idx.
  * scaling="delayed" (tensor granularity): per-operand amax history buffers
    (non-persistent); the scale uses the max of the history (the current amax on the
    very first step), then the current amax is pushed into the history.
Buffers are registered with persistent=False, so `QLinear.state_dict()` equals
`nn.Linear.state_dict()` and checkpoints move freely between the two. The generator
state and amax histories are not checkpointed (a resumed run restarts them).

Statistics: with `collect_stats(model, True)`, each QLinear accumulates the fraction
of activation entries OCC clamped and, per quantized operand, the fraction of its
nonzero entries that became zero; `quant_stats(model)` averages and resets them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import recipes as _recipes
from lowbit.estimators import dge_derivative, occ_clamp
from lowbit.quant import fake_quantize, scaled_values, underflow_fraction
from lowbit.recipes import Recipe, TensorQuant

_SR_SEED = 0x5EED_0001  # stochastic-rounding stream of layer i: _SR_SEED + i
_RHT_SEED = 0x5EED_1000  # Hadamard signs of layer i: _RHT_SEED + i
_SPARSE_MAX_DENSITY = 0.25  # CPU: below this density the OCC residual product uses CSR


# --- small pure helpers ----------------------------------------------------------------------

def _tiled(q: TensorQuant | None) -> bool:
    return q is not None and q.granularity in ("tile", "block")


def _layout_free(q: TensorQuant | None) -> bool:
    """True when Q(xᵀ) == Q(x)ᵀ: one scale for the tensor, or square blocks."""
    return q is None or q.granularity in ("tensor", "block")


def fake_quantize_2d(t: torch.Tensor, q: TensorQuant | None, generator=None, amax=None) -> torch.Tensor:
    """fake_quantize of a 2-D tensor along its last dim, zero-padding the last dim (tile,
    block) and the rows (block) up to a multiple of q.block first. None passes t through."""
    if q is None:
        return t
    R, C = t.shape
    pc = (-C) % q.block if _tiled(q) else 0
    pr = (-R) % q.block if q.granularity == "block" else 0
    if pc or pr:
        return fake_quantize(F.pad(t, (0, pc, 0, pr)), q, generator, amax)[:R, :C]
    return fake_quantize(t, q, generator, amax)


def scaled_values_2d(t: torch.Tensor, q: TensorQuant, amax=None) -> torch.Tensor:
    """t divided by its quantization scale (fp32, t's shape), padded like fake_quantize_2d."""
    R, C = t.shape
    pc = (-C) % q.block if _tiled(q) else 0
    pr = (-R) % q.block if q.granularity == "block" else 0
    if pc or pr:
        return scaled_values(F.pad(t, (0, pc, 0, pr)), q, amax=amax)[0][:R, :C]
    return scaled_values(t, q, amax=amax)[0]


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), entries ±1, fp32 [n, n]."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """R = diag(s)·H/√n with random signs s (from `seed`): an orthogonal fp32 [n, n] matrix."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return s[:, None] * hadamard_matrix(n) / math.sqrt(n)


def _rotate(a: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """a [rows, L] (L a multiple of n) times blockdiag(R, R, ...) along the last dim, in fp32."""
    rows, L = a.shape
    n = R.shape[0]
    return (a.float().view(rows, L // n, n) @ R.float()).view(rows, L)


def _emulated(t: torch.Tensor) -> bool:
    """bf16/fp16 GeMMs on CPU run as fp32 GeMMs of the upcast operands (see _mm)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a·bᵀ (+ bias) in a's dtype. A CPU without native bf16 GeMMs (AVX2) runs torch's bf16
    matmul some 60x slower than fp32; the fp32 GeMM of the upcast operands gives the same
    numbers a bf16 GeMM with fp32 accumulation gives (every bf16 product is exact in fp32),
    up to summation order, rounded once to a's dtype at the end."""
    if _emulated(a):
        return F.linear(a.float(), b.float(), None if bias is None else bias.float()).to(a.dtype)
    return F.linear(a, b, bias)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), except under CPU bf16/fp16 autocast, where the operands are
    rounded to the autocast dtype and multiplied in fp32 (see _linear): the same numbers as a
    native bf16 GeMM, differentiable, and some 10x faster on CPUs without bf16 units."""
    dev = x.device.type
    if dev != "cpu" or not torch.is_autocast_enabled(dev):
        return F.linear(x, weight, bias)
    cdtype = torch.get_autocast_dtype(dev)
    if cdtype not in (torch.bfloat16, torch.float16):
        return F.linear(x, weight, bias)
    with torch.autocast(dev, enabled=False):
        b = None if bias is None else bias.to(cdtype)
        return _linear(x.to(cdtype), weight.to(cdtype), b)


class UpcastLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose forward is upcast_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_linear(x, self.weight, self.bias)


def upcast_cpu_linears(model: nn.Module) -> nn.Module:
    """Give every plain nn.Linear left in `model` (e.g. the high-precision lm_head) the
    UpcastLinear forward, in place, so CPU bf16 autocast does not hit torch's slow bf16 GeMM.
    Numerics are unchanged (bf16 operands, fp32 accumulation, bf16 output); parameters and
    state_dict keys are the same objects and names. Call after convert()."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = UpcastLinear
    return model


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b in a's dtype (CPU bf16/fp16: in fp32, as in _linear)."""
    if _emulated(a):
        return torch.mm(a.float(), b.float()).to(a.dtype)
    return torch.mm(a, b)


def _csr(r: torch.Tensor) -> torch.Tensor | None:
    """r as a CSR tensor if at most _SPARSE_MAX_DENSITY of it is nonzero, else None."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        s = r.to_sparse_csr()
    return s if s.values().numel() <= _SPARSE_MAX_DENSITY * r.numel() else None


def _residual_mm(res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """res [M, K] · wᵀ [K, N], both in the compute dtype, accumulated in fp32 (or fp64): the
    OCC compensation. On CPU the sparse residual goes through CSR in fp32 (exact products of
    the bf16 operands; about 6x faster than a dense GeMM at 2% density); on accelerators a
    dense GeMM in the compute dtype (a data-dependent sparse layout would cost a sync; likewise under
    torch.compile, where it would break the graph)."""
    if res.device.type == "cpu" and not torch.compiler.is_compiling():
        dt = torch.promote_types(res.dtype, torch.float32)
        s = _csr(res.to(dt))
        if s is not None:
            return s @ w.to(dt).t()
    return _linear(res, w)


def _residual_tmm(dy: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """dyᵀ [N, M] · res [M, K] (the OCC compensation of dW), as _residual_mm."""
    if res.device.type == "cpu" and not torch.compiler.is_compiling():
        dt = torch.promote_types(res.dtype, torch.float32)
        s = _csr(res.to(dt))
        if s is not None:
            return (s.t() @ dy.to(dt)).t()
    return _mm(dy.t(), res)


def _check_recipe_for_linear(r: Recipe) -> None:
    if r.dge.enabled and r.weight is None:
        raise ValueError(f"recipe {r.name!r} enables DGE but does not quantize the weight; "
                         "set recipe.weight or disable dge")
    if r.scaling == "delayed" and r.grad_output is not None and r.grad_output.hadamard:
        raise ValueError(f"recipe {r.name!r}: delayed scaling with the Hadamard transform is not supported "
                         "(the rotated operands have no amax history); use scaling='current'")


# --- the autograd function ---------------------------------------------------------------------

class _QLinearFn(torch.autograd.Function):
    """Y = X·Wᵀ + b with the recipe's quantized GeMMs. x2: [M, K] (any float dtype),
    weight: [N, K], bias: [N] or None; layer: the QLinear (recipe, buffers, generator,
    statistics); cdtype: the GeMM dtype. Returns Y [M, N] in cdtype."""

    @staticmethod
    def forward(ctx, x2, weight, bias, layer, cdtype):
        r = layer.recipe
        x = x2.to(cdtype)
        w = weight.to(cdtype)
        lo = hi = res = None
        if r.occ.enabled and r.occ.alpha < 1.0 and x.numel():
            xc, res, lo, hi = occ_clamp(x, r.occ.alpha)
            if layer.collect_stats:
                layer._add_stat("occ_clamped_frac", (res != 0).float().mean())
        else:
            xc = x
        xq, _ = layer._quant(xc, r.input, "input")
        wq, w_amax = layer._quant(w, r.weight, "weight")
        y = _linear(xq, wq, None if bias is None else bias.to(cdtype))
        if res is not None and r.occ.compensate:
            y += _residual_mm(res, w).to(cdtype)
        ctx.layer, ctx.cdtype, ctx.w_amax = layer, cdtype, w_amax
        ctx.has_bias = bias is not None
        ctx.x_dtype = x2.dtype
        ctx.occ = lo is not None
        # keep quantized copies only where the transposed GeMM can reuse them
        keep_xq = _layout_free(r.input) and r.input is not None and not _hadamard(r)
        keep_wq = _layout_free(r.weight) and r.weight is not None
        # x itself is needed only to re-quantize it along tokens or to rebuild the OCC residual
        keep_x = not keep_xq or ctx.occ
        ctx.save_for_backward(x if keep_x else None, weight, xq if keep_xq else None,
                              wq if keep_wq else None, lo, hi)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, xq_saved, wq_saved, lo, hi = ctx.saved_tensors
        layer, cdtype = ctx.layer, ctx.cdtype
        r = layer.recipe
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(cdtype).contiguous()
            dyq = None
            if need_dx or (need_dw and _layout_free(r.grad_output) and not _hadamard(r)):
                dyq, _ = layer._quant(dy, r.grad_output, "grad_output")  # along N
            if need_dx:
                if wq_saved is not None:
                    wq = wq_saved
                else:  # W quantized per input channel: along N, i.e. rows of Wᵀ
                    wq = layer._quant(weight.to(cdtype).t().contiguous(), r.weight, "weight",
                                      amax=ctx.w_amax, record=False)[0].t()
                dx = _mm(dyq, wq).to(ctx.x_dtype)
            if need_dw:
                dw = _weight_grad(layer, r, x, dy, dyq, xq_saved, lo, hi, ctx.occ)
                if r.dge.enabled:
                    ws = scaled_values_2d(weight.to(cdtype), r.weight, amax=ctx.w_amax)
                    dw = dw.float() * dge_derivative(ws, r.weight.fmt, r.dge.k, r.dge.clamp)
                dw = dw.to(weight.dtype)
            if need_db and ctx.has_bias:
                db = dy.sum(0).to(layer.bias.dtype)
        return dx, dw, db, None, None


def _hadamard(r: Recipe) -> bool:
    return r.grad_output is not None and r.grad_output.hadamard


def _weight_grad(layer, r, x, dy, dyq, xq_saved, lo, hi, occ):
    """dW = Q(dYᵀ)·Q(Xcᵀ)ᵀ (+ dYᵀ·ΔX, fp32 accumulation), Xc the OCC-clamped activation.
    [N, K]. x is None when xq_saved (Q(X), reusable as Q(Xᵀ)ᵀ) is given and OCC is off."""
    if occ:
        xc = torch.clamp(x, lo, hi)
        res = x - xc if r.occ.compensate else None
    else:
        xc, res = x, None
    if _hadamard(r):
        M = xc.shape[0]
        n = r.grad_output.hadamard_size
        mult = math.lcm(n, *(q.block for q in (r.grad_output, r.input) if _tiled(q)))
        pad = (-M) % mult
        R = layer.hadamard_rotation
        dyt = _rotate(F.pad(dy.t(), (0, pad)), R).to(dy.dtype)
        xt = _rotate(F.pad(xc.t(), (0, pad)), R).to(x.dtype)
        gq, _ = layer._quant(dyt, r.grad_output, "grad_output", record=False)
        xq, _ = layer._quant(xt, r.input, "input", record=False)
        dw = _mm(gq, xq.t())
    else:
        if dyq is not None and _layout_free(r.grad_output):
            gq = dyq.t()
        else:
            gq, _ = layer._quant(dy.t().contiguous(), r.grad_output, "grad_output", record=False)
        if xq_saved is not None:
            xq = xq_saved
        else:
            xq = layer._quant(xc.t().contiguous(), r.input, "input", record=False)[0].t()
        dw = _mm(gq, xq)
    if res is not None:
        comp = _residual_tmm(dy, res)
        dw = dw.to(torch.promote_types(comp.dtype, torch.float32)) + comp
    return dw


# --- the module ----------------------------------------------------------------------------------

class QLinear(nn.Linear):
    """nn.Linear whose GeMMs follow `recipe` (name, .toml path or Recipe); see the module
    docstring. Parameters, state_dict and call signature are nn.Linear's; input [..., K]
    -> output [..., N]. A recipe that quantizes nothing and has OCC off runs F.linear
    unchanged (bit for bit nn.Linear). `layer_idx` seeds the layer's random streams."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: "str | Recipe" = "fp32", layer_idx: int = 0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup(recipe, layer_idx)

    def _setup(self, recipe, layer_idx: int) -> None:
        r = _recipes.get(recipe)
        _check_recipe_for_linear(r)
        self.recipe = r
        self.layer_idx = int(layer_idx)
        self.collect_stats = False
        self._stats: dict[str, list] = {}
        self._generators: dict[str, torch.Generator] = {}
        dev = self.weight.device
        if r.scaling == "delayed":
            for name in ("input", "weight", "grad_output"):
                if getattr(r, name) is not None:
                    self.register_buffer(f"amax_history_{name}", torch.zeros(r.amax_history_len, device=dev),
                                         persistent=False)
        if _hadamard(r):
            self.register_buffer("hadamard_rotation",
                                 random_hadamard(r.grad_output.hadamard_size, _RHT_SEED + self.layer_idx).to(dev),
                                 persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: "str | Recipe", layer_idx: int = 0) -> "QLinear":
        """A QLinear sharing `linear`'s Parameter objects (same device, dtype, values)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe, layer_idx=layer_idx)
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(recipe, layer_idx)  # buffers on the real device
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name!r}"

    @property
    def _uses_fn(self) -> bool:
        return self.recipe.quantized or self.recipe.occ.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"QLinear expects input of shape [..., {self.in_features}], got {tuple(x.shape)}")
        w = self._weight_nk()
        if not self._uses_fn:
            return upcast_linear(x, w, self.bias)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cdtype = torch.get_autocast_dtype(dev)
        else:
            cdtype = x.dtype
            if w.dtype != cdtype:
                raise TypeError(f"QLinear input is {x.dtype} but the weight is {w.dtype}; cast one of them "
                                "or run under torch.autocast")
        lead = x.shape[:-1]
        with torch.autocast(dev, enabled=False):
            y = _QLinearFn.apply(x.reshape(-1, self.in_features), w, self.bias, self, cdtype)
        return y.view(*lead, self.out_features)

    def _weight_nk(self) -> torch.Tensor:
        """The weight as the GeMM sees it, [out, in] (QConv1D stores it transposed)."""
        return self.weight

    # -- pieces used by _QLinearFn --

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device).manual_seed(_SR_SEED + self.layer_idx)
            self._generators[key] = g
        return g

    def _quant(self, t: torch.Tensor, q: TensorQuant | None, name: str, amax=None, record: bool = True):
        """(fake-quantized 2-D t along its last dim, the amax used or None). Delayed
        scaling reads the operand's amax history (and, if record, pushes t's amax)."""
        if q is None:
            return t, None
        if amax is None and self.recipe.scaling == "delayed":
            hist = getattr(self, f"amax_history_{name}")
            cur = t.abs().amax().float()
            hmax = hist.max()
            amax = torch.where(hmax > 0, hmax, cur)
            if record:
                hist.copy_(torch.cat([cur.view(1).to(hist.dtype), hist[:-1]]))
        gen = self._generator(t.device) if q.rounding == "stochastic" else None
        out = fake_quantize_2d(t, q, gen, amax)
        if self.collect_stats and record:
            self._add_stat(f"underflow_frac_{name}", underflow_fraction(t, out))
        return out, amax

    def _add_stat(self, key: str, value: torch.Tensor) -> None:
        s = self._stats.get(key)
        if s is None:
            self._stats[key] = [value.detach().float(), 1]
        else:
            s[0] = s[0] + value.detach().float()
            s[1] += 1


class QConv1D(QLinear):
    """QLinear for Hugging Face's `Conv1D` (GPT-2's c_attn/c_proj/c_fc): a linear layer whose weight
    is stored transposed, [in, out], with a bias [out].

    The parameter keeps the Conv1D layout, so `state_dict()` keys and shapes equal the Conv1D's and a
    converted Hugging Face model still saves/loads with `save_pretrained`/`from_pretrained`. The forward
    feeds the [out, in] view `weight.t()` to the same quantized GeMMs as QLinear (weights quantized per
    output channel, DGE on the same view); autograd transposes the weight gradient back into the
    [in, out] parameter. Note: `weight.shape` is therefore (in_features, out_features), unlike
    nn.Linear; code that needs the GeMM layout should call `_weight_nk()`.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module, recipe: "str | Recipe", layer_idx: int = 0) -> "QConv1D":
        """A QConv1D sharing `conv`'s Parameter objects (weight [in, out], bias [out])."""
        if not _is_conv1d(conv):
            raise TypeError(f"from_conv1d needs a transformers Conv1D, got {type(conv).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = conv.weight.shape
        new.weight = conv.weight
        new.bias = conv.bias
        new._setup(recipe, layer_idx)
        new.train(conv.training)
        return new

    @property
    def nx(self) -> int:  # Conv1D's names, for Hugging Face code that reads them
        return self.in_features

    @property
    def nf(self) -> int:
        return self.out_features

    def _weight_nk(self) -> torch.Tensor:
        return self.weight.t()


def _is_conv1d(mod: nn.Module) -> bool:
    """A transformers `Conv1D` (matched by name and module, so lowbit does not import transformers)."""
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and getattr(mod, "weight", None) is not None


# --- model-level API -------------------------------------------------------------------------------

def convert(model: nn.Module, recipe: "str | Recipe", filter_fn: Callable[[nn.Module, str], bool] | None = None
            ) -> nn.Module:
    """Swap the nn.Linear modules of `model` for QLinear under `recipe`, in place; returns model.
    Hugging Face `Conv1D` layers (GPT-2's projections, weight stored [in, out]) become QConv1D,
    which keeps that layout (the model's state_dict is unchanged).

    recipe: a registered name, a path to a .toml recipe, or a Recipe.
    filter_fn(module, fqn) -> bool: convert only layers for which it returns True.
    The output head (any Linear whose name is `lm_head`) stays in high precision unless
    `recipe.quantize_head`: the paper quantizes the transformer blocks' GeMMs and keeps the
    output projection precise, since the logits feed a softmax over the whole vocabulary
    and small relative errors there move the loss directly.
    The new modules share the old Parameter objects (an optimizer built before or after
    the conversion works), so device and dtype are unchanged. Every Linear is swapped,
    also for a recipe that quantizes nothing (QLinear then runs F.linear, bit for bit).
    Converting again with the same recipe is a no-op; an existing QLinear with a different
    recipe raises ValueError (build the model afresh to change recipes). If `model` itself
    is an nn.Linear the converted module is returned (it cannot be replaced in place).
    """
    r = _recipes.get(recipe)
    _check_recipe_for_linear(r)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    targets = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if mod.recipe != r:
                raise ValueError(f"module {fqn or '<root>'} is already a QLinear with recipe {mod.recipe.name!r}; "
                                 f"converting to {r.name!r} would mix recipes: build the model afresh")
            continue
        if type(mod) is not nn.Linear and not _is_conv1d(mod):
            continue
        if fqn.rsplit(".", 1)[-1] == "lm_head" and not r.quantize_head:
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        targets.append((fqn, mod))
    def swap(mod, i):
        return QConv1D.from_conv1d(mod, r, i) if _is_conv1d(mod) else QLinear.from_linear(mod, r, layer_idx=i)

    if targets and targets[0][0] == "":
        return swap(model, 0)
    for i, (fqn, mod) in enumerate(targets):
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, swap(mod, i))
    return model


def qlinears(model: nn.Module) -> list[QLinear]:
    return [m for m in model.modules() if isinstance(m, QLinear)]


def collect_stats(model: nn.Module, enabled: bool = True) -> None:
    """Switch the (cheap, but not free) quantization statistics of every QLinear on or off."""
    for m in qlinears(model):
        m.collect_stats = bool(enabled)


def quant_stats(model: nn.Module) -> dict[str, float]:
    """Averages of the statistics gathered since the last call, then reset. Keys:
    occ_clamped_frac (fraction of activation entries clamped), underflow_frac_{input,
    weight,grad_output} (fraction of nonzero entries quantized to zero) and underflow_frac
    (their mean); each is the mean over layers of the per-layer mean over calls. Keys with
    no data are absent (statistics off, or nothing quantized)."""
    per_key: dict[str, list[float]] = {}
    for m in qlinears(model):
        for key, (total, count) in m._stats.items():
            per_key.setdefault(key, []).append(float(total) / count)
        m._stats = {}
    out = {k: sum(v) / len(v) for k, v in per_key.items()}
    uf = [v for k, v in out.items() if k.startswith("underflow_frac_")]
    if uf:
        out["underflow_frac"] = sum(uf) / len(uf)
    return out


# --- torch.compile ---------------------------------------------------------------------------------

log = logging.getLogger("lowbit")


class CompiledModel(nn.Module):
    """`model` under torch.compile, falling back to eager with one warning if compiling fails.

    torch.compile compiles lazily, at the first call (and again on a recompile, e.g. when grad mode
    or shapes change); a failure there (no C++ compiler for inductor, an unsupported Python or op)
    raises a TorchDynamoException. The backward graph is compiled together with the forward one
    (functorch's `force_non_lazy_backward_lowering`), so its failures surface here too instead of
    in `loss.backward()`. After a failure every call runs `model` eagerly; the failed call may have
    advanced stochastic-rounding generators / amax histories once. QLinear's forward traces as one
    graph for recipes with round-to-nearest (tests/test_compile.py); stochastic rounding passes a
    torch.Generator to the quantizer, which dynamo cannot put in a graph (a graph break there).

    Calls and train()/eval() go to `model`; state_dict() and parameters() are `model`'s (save
    `model`, not this wrapper).
    """

    def __init__(self, model: nn.Module, backend: str | Callable = "inductor", **compile_kwargs):
        super().__init__()
        self.model = model
        self.failed: str | None = None
        for m in qlinears(model):  # create SR generators now: creating one inside the graph breaks it
            if any(q is not None and q.rounding == "stochastic"
                   for q in (m.recipe.input, m.recipe.weight, m.recipe.grad_output)):
                m._generator(m.weight.device)
        try:
            compiled = torch.compile(model, backend=backend, **compile_kwargs)
        except Exception as e:  # torch.compile refuses up front (e.g. an unsupported Python version)
            compiled = None
            self._fall_back(e)
        self.__dict__["_compiled"] = compiled  # not a submodule: no duplicate parameters / state_dict keys

    def _fall_back(self, e: Exception) -> None:
        inner = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the backend's error
        text = str(inner).strip()
        self.failed = f"{type(inner).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        self.__dict__["_compiled"] = None
        log.warning("torch.compile failed (%s); running the model eagerly instead (same numbers, no speed-up)",
                    self.failed)

    def forward(self, *args, **kwargs):
        compiled = self.__dict__["_compiled"]
        if compiled is not None:
            try:
                with _eager_backward_compile():
                    return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                self._fall_back(e)
        return self.model(*args, **kwargs)


def _eager_backward_compile():
    import torch._functorch.config as fconf

    if "force_non_lazy_backward_lowering" in getattr(fconf, "_config", {}):
        return fconf.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_model(model: nn.Module, backend: str | Callable = "inductor", **compile_kwargs) -> CompiledModel:
    """torch.compile `model` (after convert) with an eager fallback; see CompiledModel."""
    return CompiledModel(model, backend, **compile_kwargs)
