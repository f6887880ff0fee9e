"""DeepSeek-V3-style decoder (arXiv 2412.19437; deepseek-ai/DeepSeek-V3 inference/model.py): RMSNorm, RoPE,
multi-head latent attention (lowbit.models.mla), DeepSeekMoE feed-forwards with shared and fine-grained routed
experts, sigmoid routing and auxiliary-loss-free balancing (lowbit.models.moe), the first `n_dense_layers` dense.

Optional multi-token prediction (§2.2, `mtp_depth` D > 0): D sequential modules sharing the embedding and the
output head; module k combines the previous depth's hidden state at position i with the embedding of token i+k
and predicts token i+k+1; their mean cross-entropy, weighted by λ (`mtp_lambda`), joins the training loss (the
validation loss and generation use the main model only). Not here: node-limited (grouped) routing, YaRN.
Every GeMM is an nn.Linear (attention projections, each expert's, the dense FFNs), so `lowbit.convert` quantizes
them; the router, the norms and RoPE stay in high precision, as DeepSeek-V3 kept its gating and normalisation.
At the end: presets, parameter and FLOP counts (total and active), the mapping to transformers' DeepseekV3,
registered as FAMILY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.models.base import CausalLM, KVCache, init_gpt2_style
from lowbit.models.family import Family, HFMapping, need
from lowbit.models.llama import RMSNorm, rope_cos_sin
from lowbit.models.mla import MLA
from lowbit.models.moe import MoE, SwiGLU, after_step, moe_layers


@dataclass(frozen=True)
class DeepSeekConfig:
    """Shape of a DeepSeek-V3-style model. MLA: kv_lora_rank (d_c), q_lora_rank (0 = no query compression),
    qk_nope_head_dim + qk_rope_head_dim per query/key head, v_head_dim. MoE: n_routed_experts of width
    moe_inter_dim, n_activated_experts chosen per token, n_shared_experts always on; the first n_dense_layers
    use a dense SwiGLU of width inter_dim. bias_update_speed: γ of the balancing bias; seq_aux_alpha: α of the
    sequence-wise balance loss (DeepSeek-V3: 0.001 and 0.0001)."""

    block_size: int = 128
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 16
    inter_dim: int = 352
    moe_inter_dim: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_dense_layers: int = 1
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3
    seq_aux_alpha: float = 1e-4
    mtp_depth: int = 0
    mtp_lambda: float = 0.3
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = False

    mlp: ClassVar[str] = "moe"
    bias: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "inter_dim", "moe_inter_dim", "n_routed_experts",
                     "n_activated_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DeepSeekConfig.{name} must be a positive int, got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"DeepSeekConfig: RoPE needs an even qk_rope_head_dim, got {self.qk_rope_head_dim}")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"DeepSeekConfig: n_activated_experts={self.n_activated_experts} exceeds the "
                             f"{self.n_routed_experts} routed experts; choose at most {self.n_routed_experts}")
        if self.kv_lora_rank >= self.n_embd:
            raise ValueError(f"DeepSeekConfig: kv_lora_rank={self.kv_lora_rank} is not below n_embd={self.n_embd}: "
                             "the latent must compress; choose a smaller kv_lora_rank")
        if not (isinstance(self.mtp_depth, int) and self.mtp_depth >= 0 and self.mtp_lambda >= 0):
            raise ValueError(f"DeepSeekConfig: mtp_depth={self.mtp_depth!r} must be an int >= 0 and "
                             f"mtp_lambda={self.mtp_lambda!r} >= 0 (DeepSeek-V3: depth 1, λ 0.3 then 0.1)")
        if not 0 <= self.n_dense_layers <= self.n_layer:
            raise ValueError(f"DeepSeekConfig: n_dense_layers={self.n_dense_layers} must be in [0, n_layer]")

    # shared shape names (lowbit.flops' report line)
    @property
    def head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_head  # keys and values are decompressed per head; the cache holds the latent

    @property
    def ffn_hidden(self) -> int:
        return self.moe_inter_dim

    @property
    def mha_kv_elems(self) -> int:
        """Cached values per token of MHA with the same heads (K of width n + r, V of width v): what MLA saves."""
        return self.n_layer * self.n_head * (self.head_dim + self.v_head_dim)


class Block(nn.Module):
    def __init__(self, c: DeepSeekConfig, layer_id: int):
        super().__init__()
        d = c.n_embd
        self.attn_norm = RMSNorm(d, c.norm_eps)
        self.attn = MLA(d, c.n_head, c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim,
                        c.v_head_dim, c.norm_eps)
        self.ffn_norm = RMSNorm(d, c.norm_eps)
        self.ffn = SwiGLU(d, c.inter_dim) if layer_id < c.n_dense_layers else MoE(
            d, c.moe_inter_dim, c.n_routed_experts, c.n_shared_experts, c.n_activated_experts, c.route_scale)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, pos))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MTPModule(nn.Module):
    """One depth of multi-token prediction: h_k = Block(W [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))]) (DeepSeek-V3
    §2.2); `norm` precedes the shared output head. Its block is an MoE layer, as the model's last layers are."""

    def __init__(self, c: DeepSeekConfig):
        super().__init__()
        d = c.n_embd
        self.hnorm, self.enorm, self.norm = RMSNorm(d, c.norm_eps), RMSNorm(d, c.norm_eps), RMSNorm(d, c.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(c, c.n_layer)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos, sin) -> torch.Tensor:
        return self.block(self.proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1)), cos, sin)


class DeepSeek(CausalLM):
    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        if not isinstance(config, DeepSeekConfig):
            raise TypeError(f"DeepSeek needs a DeepSeekConfig, got {type(config).__name__}; use build_model")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = nn.ModuleList([MTPModule(config) for _ in range(config.mtp_depth)])
        init_gpt2_style(self, config.n_layer, ("attn.wo.weight", "w2.weight"))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def embedding_params(self) -> int:
        return self.embed.weight.numel()

    def moe_layers(self) -> list[MoE]:
        return moe_layers(self)

    def _trunk(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0):
        """(the last layer's output before the final norm [B, T, D], RoPE cos, sin)."""
        self._check_idx(idx, pos)
        T = idx.size(1)
        x = self.embed(idx)
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        positions = torch.arange(pos, pos + T, device=idx.device)
        cos, sin = rope_cos_sin(self.config.qk_rope_head_dim, positions, self.config.rope_theta, rope_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], pos)
        return x, cos, sin

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        return self.norm(self._trunk(idx, caches, pos)[0])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """CausalLM's (logits, loss); in training the loss adds α · the MoE layers' sequence-wise balance losses
        and λ · the multi-token prediction loss."""
        h, cos, sin = self._trunk(idx)
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        if self.training and len(self.mtp) and self.config.mtp_lambda > 0:
            loss = loss + self.config.mtp_lambda * self.mtp_loss(h, idx, targets, cos, sin)
        aux = [m.aux for m in self.moe_layers() if m.aux is not None]
        if aux and self.config.seq_aux_alpha > 0:
            loss = loss + self.config.seq_aux_alpha * torch.stack(aux).sum()
        return logits, loss

    def mtp_loss(self, h, idx, targets, cos, sin) -> torch.Tensor:
        """Mean over depths k = 1..D of the cross-entropy of depth k, which at position i reads h_{k-1}[i] and
        Emb(idx[i+k]) and predicts targets[i+k] (token i+k+1); positions shrink by one per depth."""
        T, losses = idx.size(1), []
        for k, module in enumerate(self.mtp, 1):
            if T - k < 1:
                break
            h = module(h[:, :T - k], self.embed(idx[:, k:]), cos[:T - k], sin[:T - k])
            logits = self.lm_head(module.norm(h)).float()
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets[:, k:].reshape(-1),
                                          ignore_index=-1))
        return torch.stack(losses).mean() if losses else h.new_zeros(())

    def after_optimizer_step(self) -> dict[str, float]:
        """Auxiliary-loss-free balancing: every router's bias moves by ±γ towards equal load (the trainer calls
        this after each optimizer step). Returns {"moe_load_max_over_mean": mean over MoE layers} for the metrics."""
        return after_step(self.moe_layers(), self.config.bias_update_speed)


# --- the family: presets, parameter and FLOP counts -----------------------------------------------------

PRESETS = {
    # CPU-sized: 8 routed experts of width 128 (2 active) + 1 shared, first layer dense. Every GeMM width is a
    # multiple of 128 (fp8-block's tiles, DeepSeek-V3's own recipe), hence the 128-wide RoPE key (d_c + r = 256).
    "deepseek-tiny": DeepSeekConfig(n_embd=256, n_head=2, kv_lora_rank=128, qk_nope_head_dim=64,
                                    qk_rope_head_dim=128, v_head_dim=64, inter_dim=512, moe_inter_dim=128),
    "deepseek-small": DeepSeekConfig(n_layer=6, n_head=4, n_embd=512, kv_lora_rank=128, qk_nope_head_dim=64,
                                     qk_rope_head_dim=128, v_head_dim=64, inter_dim=1024, moe_inter_dim=128,
                                     n_routed_experts=16, n_activated_experts=4, block_size=256),
    # DeepSeek-V2-Lite's shape (27 layers, d 2048, 16 heads, d_c 512, 64 routed of width 1408, 6 active + 2
    # shared, first layer dense of width 10944; 15.7B total, 2.4B active) for GPU users.
    "deepseek-v2-lite": DeepSeekConfig(n_layer=27, n_head=16, n_embd=2048, kv_lora_rank=512, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128, inter_dim=10944, moe_inter_dim=1408,
                                       n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                                       block_size=4096, vocab_size=102400),
}


def _attn_params(c: DeepSeekConfig) -> int:
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = c.n_embd * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_head * qk if c.q_lora_rank \
        else c.n_embd * c.n_head * qk
    kv = c.n_embd * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank \
        + c.kv_lora_rank * c.n_head * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + c.n_head * c.v_head_dim * c.n_embd


def _ffn_params(c: DeepSeekConfig, layer: int, active: bool) -> int:
    d = c.n_embd
    if layer < c.n_dense_layers:
        return 3 * d * c.inter_dim
    experts = c.n_activated_experts if active else c.n_routed_experts
    return c.n_routed_experts * d + (experts + c.n_shared_experts) * 3 * d * c.moe_inter_dim  # router + experts


def params(c: DeepSeekConfig) -> dict[str, int]:
    """lowbit.flops.count_params' dict plus "active" (the parameters one token uses at inference: the chosen
    experts only, no multi-token prediction modules; "total" counts those, 3 norms + projection + an MoE block each)."""
    V, d = c.vocab_size, c.n_embd
    head = 0 if c.tie_embeddings else V * d
    base = V * d + head + d + c.n_layer * (_attn_params(c) + 2 * d)
    mtp = c.mtp_depth * (3 * d + 2 * d * d + _attn_params(c) + 2 * d + _ffn_params(c, c.n_layer, False))
    total = base + mtp + sum(_ffn_params(c, i, False) for i in range(c.n_layer))
    active = base + sum(_ffn_params(c, i, True) for i in range(c.n_layer))
    return {"total": total, "embedding": V * d, "non_embedding": total - V * d, "active": active}


def flops(c: DeepSeekConfig, T: int) -> dict:
    """flops_per_token's dict on the active parameters: 2 FLOPs per active GeMM weight (the router included),
    attention 2·T·H·(n + r) for the scores and 2·T·H·v for the values; per_layer is the mean layer."""
    qk, L, d = c.qk_nope_head_dim + c.qk_rope_head_dim, c.n_layer, c.n_embd
    norms = 2 * c.kv_lora_rank + (2 * c.q_lora_rank if c.q_lora_rank else 0)  # RMSNorm weights in _attn_params
    attn_out = 2 * c.n_head * c.v_head_dim * d
    per_layer = {"qkv": 2 * _attn_params(c) - norms - attn_out, "attn_out": attn_out,
                 "mlp": round(sum(2 * _ffn_params(c, i, True) for i in range(L)) / L),
                 "attn_scores": 2 * T * c.n_head * qk, "attn_values": 2 * T * c.n_head * c.v_head_dim}
    per_layer["total"] = sum(per_layer.values())
    lm_head = 2 * d * c.vocab_size
    matmul = sum(_attn_params(c) - norms // 2 + _ffn_params(c, i, True) for i in range(L)) + d * c.vocab_size
    layers = sum(2 * (_attn_params(c) - norms // 2 + _ffn_params(c, i, True)) for i in range(L)) \
        + L * (per_layer["attn_scores"] + per_layer["attn_values"])
    return {"seq_len": T, "per_layer": per_layer, "layers": layers, "lm_head": lm_head, "forward": layers + lm_head,
            "train": 3 * (layers + lm_head), "matmul_params": matmul,
            "attention": L * (per_layer["attn_scores"] + per_layer["attn_values"])}


def kv_elems(c: DeepSeekConfig) -> int:
    """Cached values per token: the latent and the shared RoPE key of every layer (not 2·H·head_dim)."""
    return c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim)


# --- Hugging Face: transformers' DeepseekV3ForCausalLM ------------------------------------------------------
# rope_interleave=True reads our interleaved RoPE pairs as they are; one expert group (n_group = topk_group = 1)
# is plain top-K; the routed experts are fused: gate_up_proj [E, 2I, D] = [w1; w3], down_proj [E, D, I] = w2.

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def to_hf_config(tf, c: DeepSeekConfig, special: dict):
    need(c.mtp_depth == 0, "multi-token prediction modules (transformers' DeepseekV3 has none)")
    return tf.DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.inter_dim,
        moe_intermediate_size=c.moe_inter_dim, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head, n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.route_scale, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_head_dim,
        n_group=1, topk_group=1, num_experts_per_tok=c.n_activated_experts, first_k_dense_replace=c.n_dense_layers,
        norm_topk_prob=True, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_interleave=True, attention_bias=False, attention_dropout=c.dropout, hidden_act="silu",
        tie_word_embeddings=c.tie_embeddings, **special)


def from_hf_config(hc) -> DeepSeekConfig:
    need(hc.n_group in (None, 1) or hc.topk_group == hc.n_group, "node-limited (grouped) routing")
    need(bool(hc.norm_topk_prob), "unnormalised top-K gates")
    rope = dict(getattr(hc, "rope_parameters", None) or {})
    need(rope.get("rope_type", "default") == "default", f"RoPE scaling {rope.get('rope_type')!r}")
    return DeepSeekConfig(
        block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers,
        n_head=hc.num_attention_heads, n_embd=hc.hidden_size, q_lora_rank=hc.q_lora_rank or 0,
        kv_lora_rank=hc.kv_lora_rank, qk_nope_head_dim=hc.qk_nope_head_dim, qk_rope_head_dim=hc.qk_rope_head_dim,
        v_head_dim=hc.v_head_dim, inter_dim=hc.intermediate_size, moe_inter_dim=hc.moe_intermediate_size,
        n_routed_experts=hc.n_routed_experts, n_shared_experts=hc.n_shared_experts,
        n_activated_experts=hc.num_experts_per_tok, n_dense_layers=hc.first_k_dense_replace,
        route_scale=float(hc.routed_scaling_factor), norm_eps=float(hc.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))),
        tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))


def _layer_names(c: DeepSeekConfig, i: int) -> dict[str, str]:
    """lowbit name -> HF name for layer i's unfused tensors."""
    p, q = f"layers.{i}.", f"model.layers.{i}."
    names = {f"{p}attn_norm.weight": f"{q}input_layernorm.weight", f"{p}ffn_norm.weight":
             f"{q}post_attention_layernorm.weight"}
    attn = ["wq_a", "q_norm", "wq_b"] if c.q_lora_rank else ["wq"]
    names.update({f"{p}attn.{a}.weight": f"{q}self_attn.{_ATTN[a]}.weight" for a in attn + ["wkv_a", "kv_norm",
                                                                                             "wkv_b", "wo"]})
    if i < c.n_dense_layers:
        names.update({f"{p}ffn.{w}.weight": f"{q}mlp.{hf}.weight" for w, hf in _MLP.items()})
    else:
        names.update({f"{p}ffn.router.weight": f"{q}mlp.gate.weight",
                      f"{p}ffn.router.bias": f"{q}mlp.gate.e_score_correction_bias"})
        if c.n_shared_experts:
            names.update({f"{p}ffn.shared.{w}.weight": f"{q}mlp.shared_experts.{hf}.weight" for w, hf in _MLP.items()})
    return names


def to_hf_state(sd: dict[str, torch.Tensor], c: DeepSeekConfig) -> dict[str, torch.Tensor]:
    out = {hf: sd[k] for k, hf in _TOP.items() if k in sd}
    for i in range(c.n_layer):
        out.update({hf: sd[k] for k, hf in _layer_names(c, i).items()})
        if i >= c.n_dense_layers:
            e = [f"layers.{i}.ffn.experts.{j}." for j in range(c.n_routed_experts)]
            q = f"model.layers.{i}.mlp.experts."
            out[q + "gate_up_proj"] = torch.stack([torch.cat([sd[x + "w1.weight"], sd[x + "w3.weight"]]) for x in e])
            out[q + "down_proj"] = torch.stack([sd[x + "w2.weight"] for x in e])
    return out


def from_hf_state(sd: dict[str, torch.Tensor], c: DeepSeekConfig) -> dict[str, torch.Tensor]:
    out = {k: sd[hf] for k, hf in _TOP.items() if hf in sd}
    for i in range(c.n_layer):
        out.update({k: sd[hf] for k, hf in _layer_names(c, i).items()})
        if i >= c.n_dense_layers:
            q = f"model.layers.{i}.mlp.experts."
            for j in range(c.n_routed_experts):
                gate, up = sd[q + "gate_up_proj"][j].chunk(2, dim=0)
                x = f"layers.{i}.ffn.experts.{j}."
                out.update({x + "w1.weight": gate, x + "w3.weight": up, x + "w2.weight": sd[q + "down_proj"][j]})
    return out


FAMILY = Family("deepseek", "DeepSeek-V3 family (MLA + DeepSeekMoE)", DeepSeekConfig, DeepSeek,
                lambda c: (0, 0, 0), PRESETS,
                HFMapping("DeepseekV3ForCausalLM", "deepseek_v3", to_hf_config, from_hf_config, to_hf_state,
                          from_hf_state),
                params=params, flops=flops, kv_elems=kv_elems)
