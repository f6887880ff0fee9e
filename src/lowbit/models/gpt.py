"""GPT-2 family decoder in one file (nanoGPT-style).

Learned token + position embeddings, pre-LayerNorm blocks, causal self-attention
through `F.scaled_dot_product_attention`, a 4×-wide GELU MLP, final LayerNorm and
an output head `lm_head`. Every GeMM is a plain `nn.Linear`, so
`lowbit.convert(model, recipe)` can swap them for quantized layers; attention
scores, softmax, norms and the loss stay in high precision.

Module names follow GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.models.attention import sdpa


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 family model.

    bias:           biases in the Linear layers and LayerNorms (GPT-2: True).
    qkv_bias:       bias on the fused QKV projection; None means "same as `bias`".
                    The 163,009,536-parameter gpt2-small preset uses bias=True,
                    qkv_bias=False (see lowbit.models.PRESETS).
    tie_embeddings: share `lm_head.weight` with `transformer.wte.weight` (GPT-2: True;
                    lowbit's default is untied, so the head can stay high precision
                    while the embedding is trained separately).
    """

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: bool | None = None
    tie_embeddings: bool = False

    family: ClassVar[str] = "gpt"
    mlp: ClassVar[str] = "gelu"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_head dividing n_embd (e.g. head size 64)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    # Derived shapes, shared names with LlamaConfig so lowbit.flops can read either.
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head

    @property
    def ffn_hidden(self) -> int:
        return 4 * self.n_embd

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Buffers [B, n_head, max_len, head_dim] are allocated on the first update with
    the dtype/device of the keys (bf16 under autocast)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, hd] at positions pos..pos+T-1; return all keys/values up to pos+T."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.max_len, D)
            self.v = v.new_zeros(B, H, self.max_len, D)
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]


def causal_mask(T: int, pos: int, device) -> torch.Tensor | None:
    """Boolean mask [T, pos+T] letting query i (absolute position pos+i) see keys 0..pos+i.
    None when `is_causal`-free attention over all keys is already correct (T == 1)."""
    if T == 1:
        return None
    return torch.ones(T, pos + T, dtype=torch.bool, device=device).tril(diagonal=pos)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=config.use_qkv_bias)  # fused Q, K, V
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = sdpa(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = cache.update(k, v, pos)
            y = sdpa(q, k, v, attn_mask=causal_mask(T, pos, x.device), dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}; use lowbit.models.build_model")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual-stream output projections scaled by 1/sqrt(2·n_layer)
        # (two residual adds per layer) so the residual variance stays O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding=True subtracts the token and
        position embeddings (with tied weights the head is the token embedding, so it goes too)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        """idx LongTensor [B, T] at absolute positions pos..pos+T-1 -> final hidden states [B, T, C]."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a LongTensor [B, T], got dtype {idx.dtype} shape {tuple(idx.shape)}")
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}; "
                "crop the input to the last block_size tokens"
            )
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], pos)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: LongTensor [B, T] -> (logits [B, T, V] in the compute dtype,
        mean cross-entropy over targets != -1 computed in fp32, or None)."""
        logits = self.lm_head(self._hidden(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T0]; returns [B, T0 + max_new_tokens].

        temperature == 0 is greedy (argmax). The model is conditioned on at most the last
        block_size tokens. With use_cache, keys/values are cached while the whole sequence
        fits in block_size; past that, every step re-runs the cropped window (learned absolute
        positions shift with the window, so cached keys would be wrong) -- exactly what
        use_cache=False does, so both paths give the same tokens. Does not change train/eval
        mode: call model.eval() first if dropout > 0.
        """
        _check_generate_args(idx, max_new_tokens, temperature, top_k)
        block = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if use_cache and T <= block:
                if caches is None:  # prefill
                    caches = [KVCache(block) for _ in self.transformer.h]
                    h = self._hidden(idx, caches, 0)
                else:  # only the newest token; earlier ones are in the cache
                    h = self._hidden(idx[:, -1:], caches, T - 1)
            else:
                h = self._hidden(idx[:, -block:])
            logits = self.lm_head(h[:, -1, :])
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx


def _check_generate_args(idx, max_new_tokens, temperature, top_k):
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"generate needs a non-empty prompt idx [B, T>0], got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """logits [B, V] -> next token ids LongTensor [B, 1]. temperature 0 = argmax.
    `generator` must live on logits' device."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
