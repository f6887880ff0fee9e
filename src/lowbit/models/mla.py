"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2412.19437 §2.1.1): keys and values come from one
low-rank latent per token, so the KV cache holds only the latent and one RoPE key shared by all heads.

Shapes (d = n_embd, H heads, d_c = kv_lora_rank, r = qk_rope_head_dim, n = qk_nope_head_dim, v = v_head_dim):
    q                = W_q x  (or W_qb RMSNorm(W_qa x) with q_lora_rank > 0)     [H, n + r]; RoPE on the r part
    c, k_r           = W_kva x                                                    [d_c], [r]; RoPE on k_r
    c                = RMSNorm(c)                                                 (the cached latent)
    k_n, v           = W_kvb c                                                    [H, n], [H, v]
    k                = [k_n, k_r broadcast over heads]                            [H, n + r]
    y                = W_o softmax(q·kᵀ / √(n + r)) v
Every projection is an nn.Linear (lowbit.convert quantizes them); RoPE and the norms run in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.models.attention import sdpa
from lowbit.models.base import KVCache, causal_mask
from lowbit.models.llama import RMSNorm, apply_rope


class MLA(nn.Module):
    def __init__(self, dim: int, n_head: int, kv_lora_rank: int, q_lora_rank: int, nope_dim: int, rope_dim: int,
                 v_dim: int, eps: float = 1e-6):
        super().__init__()
        self.n_head, self.nope, self.rope, self.v_dim, self.d_c = n_head, nope_dim, rope_dim, v_dim, kv_lora_rank
        qk = nope_dim + rope_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps)
            self.wq_b = nn.Linear(q_lora_rank, n_head * qk, bias=False)
        else:
            self.wq = nn.Linear(dim, n_head * qk, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + rope_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_head * (nope_dim + v_dim), bias=False)
        self.wo = nn.Linear(n_head * v_dim, dim, bias=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, cos, sin, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """x [B, T, d] at positions pos..pos+T-1 -> [B, T, d]. `cache` keeps the latents [B, 1, S, d_c] (as its
        keys) and the RoPE keys [B, 1, S, r] (as its values): nothing per head is cached."""
        B, T, _ = x.shape
        H = self.n_head
        q = self._query(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        c, k_rope = self.wkv_a(x).split([self.d_c, self.rope], dim=-1)
        c, k_rope = self.kv_norm(c).unsqueeze(1), apply_rope(k_rope.unsqueeze(1), cos, sin)  # [B, 1, T, *]
        mask, is_causal = None, True
        if cache is not None:
            c, k_rope = cache.update(c, k_rope, pos)
            mask, is_causal = causal_mask(T, pos, x.device), False
        S = c.size(2)
        kv = self.wkv_b(c.squeeze(1)).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rope).to(k_nope.dtype)], dim=-1)
        y = sdpa(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal)  # scale 1/√(n + r)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
