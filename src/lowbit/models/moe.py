"""DeepSeekMoE (DeepSeek-V3, arXiv 2412.19437, §2.1.2): shared experts plus fine-grained routed experts, a sigmoid
router with auxiliary-loss-free load balancing, and the optional sequence-wise balance loss.

For token t with hidden u [D] and N_r routed experts with centroids e_i (the router's weight rows):
    s_i      = sigmoid(u · e_i)                                  affinity, fp32
    chosen   = top-K_r of (s_i + b_i)                            b: the balancing bias, used for the choice only
    g_i      = s_i / Σ_{j ∈ chosen} s_j · route_scale            gate of a chosen expert (0 elsewhere)
    y        = Σ_shared FFN(u) + Σ_{i ∈ chosen} g_i · FFN_i(u)
After every optimizer step each b_i moves by γ towards equal load: + γ if expert i received fewer tokens than
the mean since the last step, − γ if more (`Router.update_bias`). The sequence-wise loss (weight α) is
α · Σ_i f_i · P_i per sequence, f_i = N_r / (K_r·T) · #{t: i chosen}, P_i = mean_t s_i / Σ_j s_j.

Every expert is a SwiGLU of plain nn.Linear layers, so `lowbit.convert` quantizes each expert on its own (its
own scales and amax histories, as a grouped GeMM keeps per-expert scales); the router's weight is an
nn.Parameter, not a Linear, and stays in high precision (as DeepSeek-V3 kept its gating). `run_experts` is the
one place the routed GeMMs happen (tokens sorted by expert, one call per expert): where a grouped GeMM
(torch's scaled_grouped_mm) would plug in.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Sigmoid top-K router with a balancing bias. weight [E, D] (a Parameter: never quantized); buffers `bias`
    [E] (persistent: checkpointed with the weights) and `load` [E] (tokens routed since the last update).
    normalize: the gates of the chosen experts divided by their sum (DeepSeek-V3) or left as the sigmoid of
    their affinity (Llama 4)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, route_scale: float = 1.0, normalize: bool = True):
        super().__init__()
        self.top_k, self.route_scale, self.normalize = top_k, route_scale, normalize
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("bias", torch.zeros(n_experts))
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)
        self.last_load: torch.Tensor | None = None  # the load of the last update (all ranks), for the statistics

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [M, D] -> (gates [M, K] fp32, expert ids [M, K] int64, affinities s [M, E] fp32)."""
        s = F.linear(x.float(), self.weight.float()).sigmoid()
        ids = torch.topk(s + self.bias, self.top_k, dim=-1).indices
        g = s.gather(1, ids)
        g = g / g.sum(-1, keepdim=True) * self.route_scale if self.normalize else g * self.route_scale
        if self.training:
            self.load += torch.bincount(ids.flatten(), minlength=s.size(1)).to(self.load.dtype)
        return g, ids, s

    @torch.no_grad()
    def update_bias(self, gamma: float) -> dict[str, float]:
        """Move the bias by ±γ towards equal load (all ranks' load summed first, so every rank moves alike);
        reset the load. Returns {"load_max_over_mean": ..} of the loads just used (1 = perfectly balanced)."""
        load = self.load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.last_load = load
        mean = load.mean()
        if mean > 0:
            self.bias += gamma * torch.sign(mean - load)
        self.load.zero_()
        return {"load_max_over_mean": float(load.max() / mean) if mean > 0 else float("nan")}


def balance_loss(s: torch.Tensor, ids: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """The sequence-wise balance loss without its α: s [B·T, E] affinities, ids [B·T, K] chosen experts ->
    mean over the B sequences of Σ_i f_i · P_i (module docstring), a 0-d fp32 tensor."""
    E = s.size(1)
    s, ids = s.view(batch, -1, E), ids.view(batch, -1, top_k)
    T = s.size(1)
    chosen = torch.zeros_like(s).scatter_(2, ids, 1.0)  # [B, T, E]
    f = chosen.sum(1) * E / (top_k * T)
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def run_experts(experts: nn.ModuleList, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor,
                gate_input: bool = False) -> torch.Tensor:
    """Σ_k gates[:, k] · experts[ids[:, k]](x) for x [M, D] -> [M, D] (gate_input: Σ_k experts[ids[:, k]](gates[:, k]
    · x), Llama 4's order, which changes what the expert's GeMMs quantize): the (token, choice) pairs sorted by
    expert, each expert called once on its contiguous rows. An expert that got no token is called on an empty
    batch, so every expert's weights are in the graph (DDP needs a gradient, zero or not, for each)."""
    M, K = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    token = order // K
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    g = gates.flatten()[order].unsqueeze(1)
    xs = x[token] * g.to(x.dtype) if gate_input else x[token]
    outs, start = [], 0
    for expert, n in zip(experts, counts):
        outs.append(expert(xs[start:start + n]))
        start += n
    y = torch.cat(outs) if gate_input else torch.cat(outs) * g.to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    """The DeepSeekMoE feed-forward: [B, T, D] -> [B, T, D]; `aux` holds the last sequence-wise loss term.
    normalize=False, gate_input=True give Llama 4's MoE (top-1, sigmoid gate scaling the expert's input)."""

    def __init__(self, dim: int, hidden: int, n_routed: int, n_shared: int, top_k: int, route_scale: float = 1.0,
                 normalize: bool = True, gate_input: bool = False):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"top_k={top_k} must be between 1 and the {n_routed} routed experts")
        self.router = Router(dim, n_routed, top_k, route_scale, normalize)
        self.experts = nn.ModuleList([SwiGLU(dim, hidden) for _ in range(n_routed)])
        self.shared = SwiGLU(dim, hidden * n_shared) if n_shared else None
        self.gate_input = gate_input
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        gates, ids, s = self.router(flat)
        y = run_experts(self.experts, flat, gates, ids, self.gate_input)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.aux = balance_loss(s, ids, B, self.router.top_k) if self.training else None
        return y.view(B, T, D)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE feed-forwards, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def after_step(layers: list[MoE], gamma: float) -> dict[str, float]:
    """After an optimizer step: every router's bias moves by ±γ (γ = 0: the load is only measured and reset).
    Returns {"moe_load_max_over_mean": mean over the MoE layers} for the metrics ({} without a routed token)."""
    stats = [m.router.update_bias(gamma)["load_max_over_mean"] for m in layers]
    stats = [s for s in stats if s == s]
    return {"moe_load_max_over_mean": sum(stats) / len(stats)} if stats else {}


def load_records(model: nn.Module) -> list[dict]:
    """One dict per router that has been updated: {"layer": the MoE layer's name, "tokens": routed (token, choice)
    pairs per expert over the last step (all ranks), "bias": the balancing bias, "max_over_mean": max/mean load}."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Router) and m.last_load is not None:
            load = m.last_load
            mean = float(load.mean())
            out.append({"layer": name.removesuffix(".router"), "tokens": [int(v) for v in load.tolist()],
                        "bias": [float(b) for b in m.bias.tolist()],
                        "max_over_mean": float(load.max()) / mean if mean > 0 else float("nan")})
    return out
