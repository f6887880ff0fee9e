"""CausalLM: what the GPT and Llama families share (nanoGPT's forward, loss and sampling loop), and the
KV cache and sampling helpers of incremental decoding. A family implements `_hidden(idx, caches, pos)`
(token ids at absolute positions -> final hidden states), `blocks` and `embedding_params()`."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def init_gpt2_style(model: nn.Module, n_layer: int, residual_suffixes: tuple[str, ...]) -> None:
    """GPT-2's initialisation: every Linear and Embedding weight N(0, 0.02), then the residual-stream output
    projections (parameter names ending in `residual_suffixes`) N(0, 0.02/sqrt(2·n_layer))."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith(residual_suffixes):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class CausalLM(nn.Module):
    """A decoder-only language model with an output head `lm_head`; subclasses define the body."""

    config: object
    lm_head: nn.Linear

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (one KV cache each)."""
        raise NotImplementedError

    def embedding_params(self) -> int:
        """Parameters in the input embeddings (what non_embedding counts leave out)."""
        raise NotImplementedError

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def _check_idx(self, idx: torch.Tensor, pos: int) -> None:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a LongTensor [B, T], got dtype {idx.dtype} shape {tuple(idx.shape)}")
        if pos + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {pos + idx.size(1)} tokens exceeds block_size={self.config.block_size}; "
                             "crop the input to the last block_size tokens")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once); non_embedding=True subtracts the input embeddings (with tied
        weights the head is the token embedding, so it goes too)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding_params() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: LongTensor [B, T] -> (logits [B, T, V] in the compute dtype,
        mean cross-entropy over targets != -1 computed in fp32, or None)."""
        logits = self.lm_head(self._hidden(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T0]; returns [B, T0 + max_new_tokens] (see `stream`)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, use_cache, generator))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               use_cache: bool = True, generator: torch.Generator | None = None):
        """Yield the next token ids, LongTensor [B, 1], one step at a time (for printing as they come).

        temperature == 0 is greedy (argmax). The model is conditioned on at most the last block_size tokens.
        With use_cache, keys/values are cached while the whole sequence fits in block_size; past that, every
        step re-runs the cropped window (positions shift with the window, so cached keys would be wrong; with
        RoPE the deeper layers' keys still depend on the token that fell out) -- exactly what use_cache=False
        does, so both paths give the same tokens. Does not change train/eval mode: call model.eval() first if
        dropout > 0.
        """
        _check_generate_args(idx, max_new_tokens, temperature, top_k)
        block = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if use_cache and T <= block:
                if caches is None:  # prefill
                    caches = [KVCache(block) for _ in self.blocks]
                    h = self._hidden(idx, caches, 0)
                else:  # only the newest token; earlier ones are in the cache
                    h = self._hidden(idx[:, -1:], caches, T - 1)
            else:
                h = self._hidden(idx[:, -block:])
            nxt = sample_next(self.lm_head(h[:, -1, :]), temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt


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
