"""QLinear and QConv1D: nn.Linear-shaped layers whose three GeMMs run under a lowbit recipe.

Parameters, state_dict and call signature are nn.Linear's (input [..., K] -> output [..., N]): a
checkpoint moves freely between the two. The recipe becomes a frozen `spec` (lowbit.nn.spec) and the
layer's mutable state lives in its `qstate` child (lowbit.nn.state); the GeMMs are the autograd Function
of lowbit.nn.function (which adds the bias in the GeMM's accumulator; see there).

Compute dtype: under torch.autocast the operands are cast to the autocast dtype before quantizing and
every GeMM runs in it (as nn.Linear does); otherwise in the input's dtype. Master weights and bias stay
as they are (fp32); gradients come back in the parameters' / input's dtypes.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit import recipes
from lowbit.cpu_bf16 import upcast_linear
from lowbit.nn.function import QLinearFunction
from lowbit.nn.hardware import HardwareLinearFunction
from lowbit.nn.quartet import QuartetFunction
from lowbit.nn.spec import LinearSpec, check_layer
from lowbit.nn.state import LayerQuantState
from lowbit.recipes import Recipe

# recipe.scheme -> the autograd Function that runs a layer's three GeMMs (a new scheme is one entry here)
FUNCTIONS = {"lowbit": QLinearFunction, "quartet": QuartetFunction}


class QLinear(nn.Linear):
    """nn.Linear whose GeMMs follow `recipe` (name, .toml path or Recipe). A recipe that quantizes nothing
    and has OCC off runs F.linear unchanged (bit for bit nn.Linear). `layer_idx` seeds the layer's random
    streams (stochastic rounding, Hadamard signs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: "str | Recipe" = "fp32", layer_idx: int = 0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup(recipe, layer_idx)

    def _setup(self, recipe, layer_idx: int) -> None:
        self.recipe = recipes.get(recipe)
        self.spec = LinearSpec.from_recipe(self.recipe)
        check_layer(self.spec, self.in_features, self.out_features)
        self.layer_idx = int(layer_idx)
        r = self.recipe
        self.qstate = LayerQuantState(self.spec, self.layer_idx, r.amax_history_len, device=self.weight.device,
                                      amax_compute_algo=r.amax_compute_algo, margin=r.margin)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: "str | Recipe", layer_idx: int = 0) -> "QLinear":
        """A QLinear sharing `linear`'s Parameter objects (same device, dtype, values)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe, layer_idx=layer_idx)
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(recipe, layer_idx)  # state on the real device
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name!r}"

    @property
    def collect_stats(self) -> bool:
        return self.qstate.collect

    @collect_stats.setter
    def collect_stats(self, on: bool) -> None:
        self.qstate.collect = bool(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"QLinear expects input of shape [..., {self.in_features}], got {tuple(x.shape)}")
        w = self._weight_nk()
        if not self.spec.uses_function:
            return upcast_linear(x, w, self.bias)
        dev = x.device.type
        cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if cdtype != w.dtype and not torch.is_autocast_enabled(dev):
            raise TypeError(f"QLinear input is {x.dtype} but the weight is {w.dtype}; cast one of them "
                            "or run under torch.autocast")
        lead = x.shape[:-1]
        self.qstate.begin_call(x.device)  # this call's random stream (recipes that draw)
        with torch.autocast(dev, enabled=False):
            fn = HardwareLinearFunction if self.spec.hardware else FUNCTIONS[self.spec.scheme]
            y = fn.apply(x.reshape(-1, self.in_features), w, self.bias, self.spec, self.qstate, cdtype)
        self.qstate.commit()  # the amaxes this call (and the last backward) observed: the Function changes no state
        return y.view(*lead, self.out_features)

    def _weight_nk(self) -> torch.Tensor:
        """The weight as the GeMM sees it, [out, in] (QConv1D stores it transposed)."""
        return self.weight


class QConv1D(QLinear):
    """QLinear for Hugging Face's `Conv1D` (GPT-2's c_attn/c_proj/c_fc): a linear layer whose weight is
    stored transposed, [in, out], with a bias [out].

    The parameter keeps the Conv1D layout, so `state_dict()` keys and shapes equal the Conv1D's and a
    converted Hugging Face model still saves/loads with `save_pretrained`/`from_pretrained`. The forward
    feeds the [out, in] view `weight.t()` to the same quantized GeMMs as QLinear (weights quantized per
    output channel, DGE on the same view); autograd transposes the weight gradient back into the [in, out]
    parameter. Note: `weight.shape` is therefore (in_features, out_features), unlike nn.Linear; code that
    needs the GeMM layout should call `_weight_nk()`.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module, recipe: "str | Recipe", layer_idx: int = 0) -> "QConv1D":
        """A QConv1D sharing `conv`'s Parameter objects (weight [in, out], bias [out])."""
        if not is_conv1d(conv):
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


def is_conv1d(mod: nn.Module) -> bool:
    """A transformers `Conv1D` (matched by name and module, so lowbit does not import transformers)."""
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and getattr(mod, "weight", None) is not None
