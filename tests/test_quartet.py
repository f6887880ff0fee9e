"""`quartet` against a reference written here from Quartet's formulas (Castro et al. 2025; IST-DASLab/Quartet:
the QuEST and Tseng MXFP4 quantizers of its Triton kernel, its backward scheme Q(E)Q(Wt)t_Q(Et)Q(Xt)t and the
trust-masked straight-through estimator). fp32 data (no exact ties: the reference rounds ties toward zero,
lowbit to even; see the README)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import sylvester
from lowbit import recipes as R
from lowbit._io import to_toml
from lowbit.nn import QLinear
from lowbit.nn.state import call_seed
from lowbit.rng import BACKWARD_FIRST, hash_uniform, stream_key

N_H = 32


H = (sylvester(N_H) / math.sqrt(N_H)).float()


def rtn_fp4(a):
    """Quartet's kernel thresholds (|a| already scaled), sign restored."""
    m = a.abs()
    v = torch.zeros_like(m)
    for thr, val in ((0.25, 0.5), (0.75, 1.0), (1.25, 1.5), (1.75, 2.0), (2.5, 3.0), (3.5, 4.0), (5.0, 6.0)):
        v = torch.where(m > thr, val, v)
    return v * torch.where(a > 0, 1.0, -1.0)


def quest(x):
    """QuEST MXFP4 over groups of 32 of the last dim: (dequantized, trust mask)."""
    g = x.reshape(-1, 32)
    mean = g.mean(-1, keepdim=True)
    var = (g * g).mean(-1, keepdim=True) - mean * mean
    std = torch.where(var >= 0, var.clamp_min(0).sqrt(), 1.0)
    e = torch.exp2(torch.floor(torch.log2(2.92247856 / 6.0 * std + 1e-8)))
    xs = g / e
    return (rtn_fp4(xs) * e).view(x.shape), (xs.abs() < 6).view(x.shape)


def tseng(x):
    """Quartet's backward quantizer, round-to-nearest: scale 2^(floor(log2 absmax) - 2) / (3/4)."""
    g = x.reshape(-1, 32)
    e = torch.exp2(torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - 2) / 0.75
    return (rtn_fp4(g / e) * e).view(x.shape)


def rot(a, M):
    return (a.reshape(-1, M.shape[0]) @ M).reshape(a.shape)


def quartet_ref(x, w, dy, signs):
    xq, mx = quest(rot(x, H))
    wq, mw = quest(rot(w, H))
    y = xq @ wq.t()
    Rb = signs[:, None] * H
    dxh = tseng(rot(dy, Rb)) @ tseng(rot(wq.t().contiguous(), Rb)).t()
    dx = rot(dxh * mx, H.t())
    dwh = tseng(rot(dy.t().contiguous(), Rb)) @ tseng(rot(xq.t().contiguous(), Rb)).t()
    dw = rot(dwh * mw, H.t())
    return y, dx, dw


def test_quartet_matches_the_reference_formulas():
    r = R.get("quartet").replace(compute_dtype="fp32", **{"grad_output.rounding": "nearest"})
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    q = QLinear.from_linear(copy.deepcopy(lin), r)
    x, dy = torch.randn(64, 64), torch.randn(64, 96)
    # the signs the backward will draw: the first key of the backward's part of the layer's call-0 stream,
    # re-derived here in Python integers: u < 1/2 -> +1
    key = stream_key(call_seed(q.layer_idx, 0), BACKWARD_FIRST)
    xr = x.clone().requires_grad_(True)
    y = q(xr)
    y.backward(dy)
    signs = torch.where(hash_uniform(torch.arange(N_H, dtype=torch.int32), key) < 0.5, 1.0, -1.0)
    ry, rdx, rdw = quartet_ref(x, lin.weight.detach(), dy, signs)
    # fp32 products summed in another order; the backward adds two rotations and a second quantization on top, so
    # a rounding difference can move an element across a grid midpoint: 1e-4 there
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, rdx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, rdw, rtol=1e-4, atol=1e-4)


def test_quartet_backward_is_unbiased_and_redraws_signs():
    """With stochastic rounding the mean of many backward passes approaches the masked straight-through
    gradient (the reference's unbiasedness claim); two passes use different random rotations."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    q = QLinear.from_linear(copy.deepcopy(lin), R.get("quartet").replace(compute_dtype="fp32"))
    x, dy = torch.randn(32, 64), torch.randn(32, 32)
    grads = []
    for _ in range(200):
        xr = x.clone().requires_grad_(True)
        q(xr).backward(dy)
        grads.append(xr.grad.clone())
    assert not torch.equal(grads[0], grads[1])
    xq, mx = quest(rot(x, H))
    wq, _ = quest(rot(lin.weight.detach(), H))
    ste = rot((dy @ wq) * mx, H.t())  # E[Q_b(a)] = a: the unquantized backward of the masked STE
    mean = torch.stack(grads).mean(0)
    assert (mean - ste).norm() / ste.norm() < 0.05
    assert (grads[0] - ste).norm() / ste.norm() > 0.1  # one pass is noisy: the mean is doing the work


def test_quartet_refuses_widths_it_cannot_rotate():
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of 32"):  # at construction, not forward
        QLinear(48, 32, recipe="quartet")
    with pytest.raises(ValueError, match="out_features=48 is not a multiple of 32"):
        QLinear(64, 48, recipe="quartet")
    with pytest.raises(ValueError, match="own backward"):  # a recipe-only conflict: the Recipe itself refuses
        R.get("quartet").replace(**{"dge.enabled": True})
    d = R.get("quartet").to_dict()
    d["dge"]["enabled"] = True
    with pytest.raises(ValueError, match="own backward"):  # also from TOML
        R.Recipe.from_toml(to_toml(d))


