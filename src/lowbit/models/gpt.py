"""GPT-2 family decoder in one file (nanoGPT-style).

Learned token + position embeddings, pre-LayerNorm blocks, causal self-attention
through `F.scaled_dot_product_attention`, a 4×-wide GELU MLP, final LayerNorm and
an output head `lm_head`. Every GeMM is a plain `nn.Linear`, so
`lowbit.convert(model, recipe)` can swap them for quantized layers; attention
scores, softmax, norms and the loss stay in high precision.

Module names follow GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...). At the end: the
family's presets, parameter formula and Hugging Face mapping (GPT2LMHeadModel), registered as FAMILY.
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


class GPT(CausalLM):
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

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def embedding_params(self) -> int:
        return self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        """idx LongTensor [B, T] at absolute positions pos..pos+T-1 -> final hidden states [B, T, C]."""
        self._check_idx(idx, pos)
        T = idx.size(1)
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], pos)
        return self.transformer.ln_f(x)


# --- the family: presets, parameter count, Hugging Face mapping -----------------------------------------

PRESETS = {
    # CPU-sized, same layout as gpt2-small (no QKV bias, untied head).
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048, qkv_bias=False),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=2048, qkv_bias=False),
    "gpt2-small": GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True, qkv_bias=False
    ),
}


def layer_params(c: GPTConfig) -> tuple[int, int, int]:
    """(parameters per layer, embedding parameters (token + position), final LayerNorm parameters)."""
    d, b, h = c.n_embd, int(c.bias), c.ffn_hidden
    ln = d * (1 + b)  # LayerNorm weight (+ bias)
    attn = d * 3 * d + 3 * d * int(c.use_qkv_bias) + d * d + d * b
    mlp = d * h + h * b + h * d + d * b
    return 2 * ln + attn + mlp, c.vocab_size * d + c.block_size * d, ln


# lowbit's nn.Linear projections are HF Conv1D ([in, out]); lowbit's absent biases become zeros (they add nothing)
_PROJ = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _transposed(k: str) -> bool:
    return k.endswith(".weight") and any(f".{p}." in k for p in _PROJ)


def to_hf_config(tf, c: GPTConfig, special: dict):
    return tf.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                         n_head=c.n_head, n_inner=c.ffn_hidden, activation_function="gelu", resid_pdrop=c.dropout,
                         embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=1e-5,
                         tie_word_embeddings=c.tie_embeddings, **special)


def from_hf_config(hc) -> GPTConfig:
    act = hc.activation_function
    need(act == "gelu", f"activation_function={act!r}; lowbit's GPT uses exact GELU ('gelu')")
    need(hc.n_inner in (None, 4 * hc.n_embd), f"n_inner={hc.n_inner}; lowbit's MLP is 4×n_embd")
    need(abs(hc.layer_norm_epsilon - 1e-5) < 1e-12,
         f"layer_norm_epsilon={hc.layer_norm_epsilon}; lowbit's LayerNorm uses 1e-5")
    need(not hc.scale_attn_by_inverse_layer_idx and hc.scale_attn_weights,
         "attention scaling other than 1/sqrt(head_dim)")
    return GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                     n_embd=hc.n_embd, dropout=float(hc.resid_pdrop), bias=True, qkv_bias=True,
                     tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))


def to_hf_state(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    out = {k: v.t().contiguous() if _transposed(k) else v for k, v in sd.items()}
    d, zeros_like = c.n_embd, sd["transformer.wte.weight"]
    zeros = {"attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d, "mlp.c_fc.bias": c.ffn_hidden,
             "mlp.c_proj.bias": d, "ln_1.bias": d, "ln_2.bias": d}
    for i in range(c.n_layer):
        for name, n in zeros.items():
            out.setdefault(f"transformer.h.{i}.{name}", zeros_like.new_zeros(n))
    out.setdefault("transformer.ln_f.bias", zeros_like.new_zeros(d))
    return out


def from_hf_state(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    want_bias = {"attn.c_attn.bias": c.use_qkv_bias, "attn.c_proj.bias": c.bias, "mlp.c_fc.bias": c.bias,
                 "mlp.c_proj.bias": c.bias, "ln_1.bias": c.bias, "ln_2.bias": c.bias, "ln_f.bias": c.bias}
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # old HF causal-mask buffers
            continue
        suffix = next((s for s in want_bias if k.endswith("." + s)), None)
        if suffix is not None and not want_bias[suffix]:
            if torch.count_nonzero(v):
                raise ValueError(f"{k} is nonzero but the lowbit config has no such bias; "
                                 "load it into a config with bias=True / qkv_bias=True")
            continue
        out[k] = v.t().contiguous() if _transposed(k) else v
    return out


FAMILY = Family("gpt", "GPT-2 family", GPTConfig, GPT, layer_params, PRESETS,
                HFMapping("GPT2LMHeadModel", "gpt2", to_hf_config, from_hf_config, to_hf_state, from_hf_state))
