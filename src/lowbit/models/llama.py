"""LLaMA-2 family decoder in one file.

Token embedding (no position embedding), pre-RMSNorm blocks, rotary position
embeddings (RoPE) on queries and keys, optional grouped-query attention
(n_kv_head < n_head), a SwiGLU MLP, final RMSNorm and an untied output head
`lm_head`. No biases anywhere. Every GeMM is a plain `nn.Linear` (so
`lowbit.convert` can quantize it); RoPE, softmax, norms and the loss run in fp32.

Module names follow Meta's reference (`layers.0.attention.wq`, `feed_forward.w1`, ...),
except that the head is called `lm_head` as everywhere in lowbit. At the end: the family's presets, parameter
formula and Hugging Face mapping (LlamaForCausalLM), registered as FAMILY.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.models.attention import sdpa
from lowbit.models.base import CausalLM, KVCache, causal_mask
from lowbit.models.family import Family, HFMapping, need


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA-2 family model.

    n_kv_head:          key/value heads (grouped-query attention); None = n_head (plain MHA).
    multiple_of, ffn_dim_multiplier, intermediate_size: SwiGLU hidden width. LLaMA's rule
        h = multiple_of · ceil(m · int(8·d/3) / multiple_of) with m = ffn_dim_multiplier (or 1),
        unless intermediate_size is given explicitly (see `ffn_hidden`).
    """

    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 2048
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    intermediate_size: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = False

    family: ClassVar[str] = "llama"
    mlp: ClassVar[str] = "swiglu"
    bias: ClassVar[bool] = False
    use_qkv_bias: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "multiple_of"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LlamaConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: RoPE needs an even head_dim, got {self.head_dim} (n_embd/n_head)")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"LlamaConfig: n_kv_head={self.n_kv_head} must be positive and divide n_head={self.n_head}"
            )
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"LlamaConfig.intermediate_size must be positive, got {self.intermediate_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width. 8d/3 keeps the 3-matrix MLP at the parameter count of a
        4d GELU MLP (3·d·8d/3 = 2·d·4d); rounded up to a multiple of `multiple_of` for
        GeMM-friendly shapes (d=4096, multiple_of=256 -> 11008, LLaMA-2 7B)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        h = int(2 * 4 * self.n_embd / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * math.ceil(h / self.multiple_of)


def rope_cos_sin(head_dim: int, positions: torch.Tensor, theta: float = 10000.0, dtype=torch.float32):
    """Rotation angles for RoPE. positions: LongTensor [T] -> (cos, sin), each [T, head_dim/2]
    in `dtype` (fp32, or fp64 for float64 models). Pair i rotates at frequency theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by position: each adjacent pair (x[2i], x[2i+1]) (Meta's interleaved
    layout) is rotated by angle pos·freq_i. cos, sin: [T, hd/2]. Computed in cos's dtype (fp32),
    returned in x's dtype. A rotation: norms are preserved and q·k depends only on the offset."""
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, hd
        self.dropout = config.dropout
        self.wq = nn.Linear(d, config.n_head * hd, bias=False)
        self.wk = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(config.n_head * hd, d, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def position(self, q, k, cos, sin, pos: int):
        """Position information for q [B, H, T, hd] and k [B, kv, T, hd] at positions pos..pos+T-1: RoPE (the one
        thing a subclass changes, e.g. Llama 4's NoPE layers)."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.position(q, k, cos, sin, pos)
        mask, is_causal = None, True
        if cache is not None:  # cache holds the n_kv_head (un-repeated) keys and values
            k, v = cache.update(k, v, pos)
            mask, is_causal = causal_mask(T, pos, x.device), False
        if self.n_kv_head != self.n_head:  # GQA: each kv head serves n_head/n_kv_head query heads
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h = config.ffn_hidden
        self.w1 = nn.Linear(config.n_embd, h, bias=False)  # gate
        self.w3 = nn.Linear(config.n_embd, h, bias=False)  # up
        self.w2 = nn.Linear(h, config.n_embd, bias=False)  # down
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama needs a LlamaConfig, got {type(config).__name__}; use lowbit.models.build_model")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)
        # Residual-stream output projections scaled by 1/sqrt(2·n_layer), as in GPT-2.
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def embedding_params(self) -> int:
        return self.tok_embeddings.weight.numel()

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        """idx LongTensor [B, T] at absolute positions pos..pos+T-1 -> final hidden states [B, T, C]."""
        self._check_idx(idx, pos)
        T = idx.size(1)
        x = self.dropout(self.tok_embeddings(idx))
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        positions = torch.arange(pos, pos + T, device=idx.device)
        cos, sin = rope_cos_sin(self.config.head_dim, positions, self.config.rope_theta, rope_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], pos)
        return self.norm(x)


# --- the family: presets, parameter count, Hugging Face mapping -----------------------------------------

PRESETS = {
    # CPU-sized.
    "llama-tiny": LlamaConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-small": LlamaConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=2048),
    # Below tiny, for tokens-per-parameter ladders a CPU can reach (`lowbit ladder`): D/N = 100 on llama-micro is
    # 10.7M tokens (non-embedding count), under one pass over the debian-docs corpus.
    "llama-nano": LlamaConfig(n_layer=1, n_head=2, n_embd=64, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-micro": LlamaConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-mini": LlamaConfig(n_layer=3, n_head=3, n_embd=96, block_size=128, vocab_size=2048, multiple_of=32),
    # FP4-paper sizes (lowbit.models' docstring gives the shape choices).
    "llama-400m": LlamaConfig(n_layer=24, n_head=16, n_embd=1024, block_size=2048, vocab_size=32000),
    "llama-1.3b": LlamaConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=32000,
                              multiple_of=128),
}


def layer_params(c: LlamaConfig) -> tuple[int, int, int]:
    """(parameters per layer, token-embedding parameters, final RMSNorm parameters); no biases anywhere."""
    d, kv = c.n_embd, c.kv_heads * c.head_dim
    attn = d * d + 2 * d * kv + d * d  # wq, wk, wv, wo
    return 2 * d + attn + 3 * d * c.ffn_hidden, c.vocab_size * d, d  # two RMSNorm weights, w1/w3/w2


# lowbit per-layer name -> HF per-layer name
_HF_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}


def rope_perm(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order taking lowbit's interleaved-pair q/k rows (Meta's RoPE layout) to HF's half-split layout, per
    head: [0, 2, 4, ..., 1, 3, 5, ...]. q·k is unchanged, since q and k get the same permutation."""
    per_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def to_hf_config(tf, c: LlamaConfig, special: dict):
    return tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
                          num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                          head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                          rope_theta=c.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
                          attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings, **special)


def from_hf_config(hc) -> LlamaConfig:
    need(hc.hidden_act == "silu", f"hidden_act={hc.hidden_act!r}; lowbit's Llama uses SwiGLU (silu)")
    need(not hc.attention_bias and not getattr(hc, "mlp_bias", False), "biased projections")
    hd = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    need(hd * hc.num_attention_heads == hc.hidden_size,
         f"head_dim={hd} × {hc.num_attention_heads} heads != hidden_size={hc.hidden_size}")
    rope = dict(getattr(hc, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
    need(rope.get("rope_type", "default") == "default" and not getattr(hc, "rope_scaling", None)
         or rope.get("rope_type") == "default", f"RoPE scaling {rope.get('rope_type')!r}; lowbit implements plain RoPE")
    return LlamaConfig(block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers,
                       n_head=hc.num_attention_heads, n_embd=hc.hidden_size, n_kv_head=hc.num_key_value_heads,
                       intermediate_size=hc.intermediate_size, norm_eps=float(hc.rms_norm_eps),
                       rope_theta=float(theta), dropout=float(getattr(hc, "attention_dropout", 0.0)),
                       tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))


def to_hf_state(sd: dict[str, torch.Tensor], c: LlamaConfig) -> dict[str, torch.Tensor]:
    perm = {"attention.wq.weight": rope_perm(c.n_head, c.head_dim),
            "attention.wk.weight": rope_perm(c.kv_heads, c.head_dim)}
    out = {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        out[f"model.layers.{i}.{_HF_NAMES[rest]}"] = v[perm[rest]] if rest in perm else v
    return out


def from_hf_state(sd: dict[str, torch.Tensor], c: LlamaConfig) -> dict[str, torch.Tensor]:
    inv_names, inv_top = {v: k for k, v in _HF_NAMES.items()}, {v: k for k, v in _HF_TOP.items()}
    inv_perm = {"attention.wq.weight": torch.argsort(rope_perm(c.n_head, c.head_dim)),
                "attention.wk.weight": torch.argsort(rope_perm(c.kv_heads, c.head_dim))}
    out = {}
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v
        elif k.startswith("model.layers.") and not k.endswith("rotary_emb.inv_freq"):
            _, _, i, rest = k.split(".", 3)
            name = inv_names[rest]
            out[f"layers.{i}.{name}"] = v[inv_perm[name]] if name in inv_perm else v
    return out


FAMILY = Family("llama", "LLaMA-2 family", LlamaConfig, Llama, layer_params, PRESETS,
                HFMapping("LlamaForCausalLM", "llama", to_hf_config, from_hf_config, to_hf_state, from_hf_state))
