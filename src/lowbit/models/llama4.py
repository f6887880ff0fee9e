"""Llama-4-style decoder (Meta's Llama 4 Scout/Maverick text model, as transformers' modeling_llama4.py builds it):
RMSNorm, grouped-query attention with RoPE on three layers of every four (every `nope_layer_interval`-th layer
has no position encoding: NoPE), a weightless RMSNorm on queries and keys in the RoPE layers (`use_qk_norm`),
and feed-forwards that alternate dense and mixture-of-experts (`interleave_moe_layer_step`: Maverick 2, Scout 1).

An MoE layer: one shared expert plus `n_experts` routed experts, top-1 routing; the chosen expert's gate is the
sigmoid of its router logit (not normalised over experts) and scales the expert's *input* (Llama 4's order, so the
expert's GeMMs quantize gated activations); y = shared(x) + expert(gate · x). NoPE layers scale queries by
1 + attn_scale · log(1 + floor((pos + 1) / floor_scale)) ("attention temperature tuning"), which is 1 below
floor_scale = 8192 positions. Not here: chunked local attention in the RoPE layers (8192-token chunks, longer than
any preset's context), the vision tower. Every GeMM is an nn.Linear; the router weight is a Parameter and stays in
high precision. At the end: presets, total/active parameter and FLOP counts, registered as FAMILY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from lowbit.models.base import CausalLM, KVCache, init_gpt2_style
from lowbit.models.family import Family, HFMapping, need
from lowbit.models.llama import Attention, RMSNorm, apply_rope, rope_cos_sin
from lowbit.models.moe import MoE, SwiGLU, after_step, moe_layers


@dataclass(frozen=True)
class Llama4Config:
    """Shape of a Llama-4-style model. intermediate_size: width of each routed expert and of the shared expert;
    intermediate_size_mlp: width of the dense layers' SwiGLU. bias_update_speed: γ of DeepSeek-V3's balancing
    bias (0 = Llama 4's router, which has none; the load is still measured)."""

    block_size: int = 128
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    intermediate_size: int = 128
    intermediate_size_mlp: int = 256
    n_experts: int = 8
    top_k: int = 1
    interleave_moe_layer_step: int = 2
    nope_layer_interval: int = 4
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    bias_update_speed: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    dropout: float = 0.0
    tie_embeddings: bool = False

    mlp: ClassVar[str] = "moe"
    bias: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                     "intermediate_size_mlp", "n_experts", "top_k", "interleave_moe_layer_step",
                     "nope_layer_interval", "floor_scale"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Llama4Config.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head or self.head_dim % 2:
            raise ValueError(f"Llama4Config: n_embd={self.n_embd} must split into {self.n_head} heads of even width")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"Llama4Config: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.top_k > self.n_experts:
            raise ValueError(f"Llama4Config: top_k={self.top_k} exceeds the {self.n_experts} experts; choose at "
                             f"most {self.n_experts}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        return self.intermediate_size

    def is_moe(self, layer: int) -> bool:
        return (layer + 1) % self.interleave_moe_layer_step == 0

    def uses_rope(self, layer: int) -> bool:
        return (layer + 1) % self.nope_layer_interval != 0


def qk_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last dim, in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4Attention(Attention):
    """LLaMA's GQA attention with Llama 4's per-layer rules: RoPE + QK-norm, or NoPE + temperature tuning."""

    def __init__(self, config: Llama4Config, layer: int):
        super().__init__(config)
        self.c, self.rope = config, config.uses_rope(layer)

    def position(self, q, k, cos, sin, pos: int):
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.c.use_qk_norm:
                q, k = qk_rms(q, self.c.norm_eps), qk_rms(k, self.c.norm_eps)
        elif self.c.attn_temperature_tuning:
            T = q.size(2)
            p = torch.arange(pos, pos + T, device=q.device, dtype=torch.float32)
            scale = torch.log1p(torch.floor((p + 1) / self.c.floor_scale)) * self.c.attn_scale + 1
            q = (q * scale.view(1, 1, T, 1)).to(q.dtype)
        return q, k


class Block(nn.Module):
    def __init__(self, c: Llama4Config, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.attention = Llama4Attention(c, layer)
        self.ffn_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.feed_forward = MoE(c.n_embd, c.intermediate_size, c.n_experts, 1, c.top_k, normalize=False,
                                gate_input=True) if c.is_moe(layer) else SwiGLU(c.n_embd, c.intermediate_size_mlp)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, pos)
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Llama4(CausalLM):
    def __init__(self, config: Llama4Config):
        super().__init__()
        if not isinstance(config, Llama4Config):
            raise TypeError(f"Llama4 needs a Llama4Config, got {type(config).__name__}; use build_model")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        init_gpt2_style(self, config.n_layer, ("attention.wo.weight", "w2.weight"))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def embedding_params(self) -> int:
        return self.tok_embeddings.weight.numel()

    def moe_layers(self) -> list[MoE]:
        return moe_layers(self)

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        self._check_idx(idx, pos)
        x = self.tok_embeddings(idx)
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        positions = torch.arange(pos, pos + idx.size(1), device=idx.device)
        cos, sin = rope_cos_sin(self.config.head_dim, positions, self.config.rope_theta, rope_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], pos)
        return self.norm(x)

    def after_optimizer_step(self) -> dict[str, float]:
        """The routers' load since the last step (and, with bias_update_speed > 0, DeepSeek's balancing)."""
        return after_step(self.moe_layers(), self.config.bias_update_speed)


# --- the family: presets, parameter and FLOP counts -----------------------------------------------------

PRESETS = {
    # CPU-sized, Maverick's pattern: dense and MoE layers alternate, 8 routed experts of width 128 + 1 shared,
    # top-1; layer 4 is NoPE. Every GeMM width is a multiple of 128 (fp8-block's tiles): 2 kv heads of 64.
    "llama4-tiny": Llama4Config(n_embd=256, intermediate_size=128, intermediate_size_mlp=512),
    "llama4-small": Llama4Config(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=256,
                                 intermediate_size_mlp=1024, n_experts=16, block_size=256),
    # Llama 4 Scout's text shape (48 layers, d 5120, 40 heads / 8 kv, 16 experts of width 8192 + 1 shared, every
    # layer MoE; 109B total, 17B active) for GPU users.
    "llama4-scout": Llama4Config(n_layer=48, n_head=40, n_kv_head=8, n_embd=5120, intermediate_size=8192,
                                 intermediate_size_mlp=16384, n_experts=16, interleave_moe_layer_step=1,
                                 block_size=8192, vocab_size=202048),
}


def _attn(c: Llama4Config) -> int:
    kv = c.kv_heads * c.head_dim
    return 2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv


def _ffn(c: Llama4Config, layer: int, active: bool) -> int:
    d = c.n_embd
    if not c.is_moe(layer):
        return 3 * d * c.intermediate_size_mlp
    experts = c.top_k if active else c.n_experts
    return c.n_experts * d + (experts + 1) * 3 * d * c.intermediate_size  # router + routed + shared


def params(c: Llama4Config) -> dict[str, int]:
    """lowbit.flops.count_params' dict plus "active" (the parameters one token uses)."""
    V, d = c.vocab_size, c.n_embd
    base = V * d + (0 if c.tie_embeddings else V * d) + d + c.n_layer * (_attn(c) + 2 * d)
    total = base + sum(_ffn(c, i, False) for i in range(c.n_layer))
    active = base + sum(_ffn(c, i, True) for i in range(c.n_layer))
    return {"total": total, "embedding": V * d, "non_embedding": total - V * d, "active": active}


def flops(c: Llama4Config, T: int) -> dict:
    """flops_per_token's dict on the active parameters (2 FLOPs per active GeMM weight, the router included;
    attention 2·T·n_embd for the scores and as much for the values); per_layer is the mean layer."""
    L, d = c.n_layer, c.n_embd
    mlp = sum(2 * _ffn(c, i, True) for i in range(L))
    per_layer = {"qkv": 2 * (_attn(c) - d * d), "attn_out": 2 * d * d, "mlp": round(mlp / L),
                 "attn_scores": 2 * T * d, "attn_values": 2 * T * d}
    per_layer["total"] = sum(per_layer.values())
    attention = L * (per_layer["attn_scores"] + per_layer["attn_values"])
    layers = L * 2 * _attn(c) + mlp + attention
    lm_head = 2 * d * c.vocab_size
    matmul = L * _attn(c) + mlp // 2 + d * c.vocab_size
    return {"seq_len": T, "per_layer": per_layer, "layers": layers, "lm_head": lm_head, "forward": layers + lm_head,
            "train": 3 * (layers + lm_head), "matmul_params": matmul, "attention": attention}


# --- Hugging Face: transformers' Llama4ForCausalLM (text model) -------------------------------------------
# Same RoPE layout (Meta's interleaved pairs), so q/k rows need no permutation; the routed experts are stored
# fused: gate_up_proj [E, D, 2I] = [w1ᵀ | w3ᵀ], down_proj [E, I, D] = w2ᵀ.

_ATTN = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
         "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
         "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def to_hf_config(tf, c: Llama4Config, special: dict):
    need(c.bias_update_speed == 0, "a balancing bias (bias_update_speed > 0): Llama 4's router has none")
    return tf.Llama4TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        intermediate_size_mlp=c.intermediate_size_mlp, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, num_experts_per_tok=c.top_k, num_local_experts=c.n_experts,
        interleave_moe_layer_step=c.interleave_moe_layer_step, no_rope_layer_interval=c.nope_layer_interval,
        use_qk_norm=c.use_qk_norm, attn_temperature_tuning=c.attn_temperature_tuning, floor_scale=c.floor_scale,
        attn_scale=c.attn_scale, attention_chunk_size=None, hidden_act="silu", attention_dropout=c.dropout,
        tie_word_embeddings=c.tie_embeddings, **special)


def from_hf_config(hc) -> Llama4Config:
    need(getattr(hc, "attention_chunk_size", None) is None, "chunked attention (attention_chunk_size)")
    return Llama4Config(
        block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers,
        n_head=hc.num_attention_heads, n_kv_head=hc.num_key_value_heads, n_embd=hc.hidden_size,
        intermediate_size=hc.intermediate_size, intermediate_size_mlp=hc.intermediate_size_mlp,
        n_experts=hc.num_local_experts, top_k=hc.num_experts_per_tok,
        interleave_moe_layer_step=hc.interleave_moe_layer_step, nope_layer_interval=hc.no_rope_layer_interval,
        use_qk_norm=bool(hc.use_qk_norm), attn_temperature_tuning=bool(hc.attn_temperature_tuning),
        floor_scale=hc.floor_scale, attn_scale=hc.attn_scale, norm_eps=float(hc.rms_norm_eps),
        tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))


def to_hf_state(sd: dict[str, torch.Tensor], c: Llama4Config) -> dict[str, torch.Tensor]:
    out = {_TOP[k]: v for k, v in sd.items() if k in _TOP}
    for i in range(c.n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out.update({q + hf: sd[p + ours] for ours, hf in _ATTN.items()})
        f = p + "feed_forward."
        if not c.is_moe(i):
            out.update({f"{q}feed_forward.{hf}.weight": sd[f"{f}{w}.weight"] for w, hf in _MLP.items()})
            continue
        out[q + "feed_forward.router.weight"] = sd[f + "router.weight"]
        out.update({f"{q}feed_forward.shared_expert.{hf}.weight": sd[f"{f}shared.{w}.weight"]
                    for w, hf in _MLP.items()})
        w = {n: torch.stack([sd[f"{f}experts.{e}.{n}.weight"] for e in range(c.n_experts)]) for n in _MLP}
        out[q + "feed_forward.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], 1).transpose(1, 2).contiguous()
        out[q + "feed_forward.experts.down_proj"] = w["w2"].transpose(1, 2).contiguous()
    return out


def from_hf_state(sd: dict[str, torch.Tensor], c: Llama4Config) -> dict[str, torch.Tensor]:
    out = {k: sd[hf] for k, hf in _TOP.items() if hf in sd}
    for i in range(c.n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out.update({p + ours: sd[q + hf] for ours, hf in _ATTN.items()})
        f, g = p + "feed_forward.", q + "feed_forward."
        if not c.is_moe(i):
            out.update({f"{f}{w}.weight": sd[f"{g}{hf}.weight"] for w, hf in _MLP.items()})
            continue
        out[f + "router.weight"] = sd[g + "router.weight"]
        out[f + "router.bias"] = torch.zeros(c.n_experts)
        out.update({f"{f}shared.{w}.weight": sd[f"{g}shared_expert.{hf}.weight"] for w, hf in _MLP.items()})
        gate, up = sd[g + "experts.gate_up_proj"].transpose(1, 2).chunk(2, dim=1)
        for e in range(c.n_experts):
            out.update({f"{f}experts.{e}.w1.weight": gate[e].contiguous(),
                        f"{f}experts.{e}.w3.weight": up[e].contiguous(),
                        f"{f}experts.{e}.w2.weight": sd[g + "experts.down_proj"][e].T.contiguous()})
    return out


FAMILY = Family("llama4", "Llama 4 family (GQA + NoPE + alternating MoE)", Llama4Config, Llama4,
                lambda c: (0, 0, 0), PRESETS,
                HFMapping("Llama4ForCausalLM", "llama4_text", to_hf_config, from_hf_config, to_hf_state, from_hf_state),
                params=params, flops=flops)
