"""LLaMA-2 family decoder in one file.

Token embedding (no position embedding), pre-RMSNorm blocks, rotary position
embeddings (RoPE) on queries and keys, optional grouped-query attention
(n_kv_head < n_head), a SwiGLU MLP, final RMSNorm and an untied output head
`lm_head`. No biases anywhere. Every GeMM is a plain `nn.Linear` (so
`lowbit.convert` can quantize it); RoPE, softmax, norms and the loss run in fp32.

Module names follow Meta's reference (`layers.0.attention.wq`, `feed_forward.w1`, ...),
except that the head is called `lm_head` as everywhere in lowbit.
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

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
