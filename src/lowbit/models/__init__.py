"""Model families and named presets.

    build_model("tiny", vocab_size=tok.vocab_size)      # GPT-2 family, 1.3M params
    build_model("llama-1.3b", block_size=1024)           # overrides any config field
    get_config("gpt2-small")                            # -> GPTConfig

Presets (parameter counts at the preset's default vocabulary; `lowbit flops --model NAME`
prints the full accounting; tests/test_models.py checks every count):

  name         family  layers  d_model  heads(kv)  d_ff   context  vocab   params
  tiny         gpt     4       128      4          512    128      2048    1,332,480
  small        gpt     6       384      6          1536   256      2048    12,311,808
  gpt2-small   gpt     12      768      12         3072   1024     50257   163,009,536
  llama-tiny   llama   4       128      4          352    128      2048    1,328,256
  llama-small  llama   6       384      6          1024   256      2048    12,194,688
  llama-nano   llama   1       64       2          192    128      2048    315,584   (53,440 non-emb.)
  llama-micro  llama   2       64       2          192    128      2048    368,960   (106,816 non-emb.)
  llama-mini   llama   3       96       3          256    128      2048    725,664   (332,448 non-emb.)
  llama-400m   llama   24      1024     16         2816   2048     32000   373,867,520
  llama-1.3b   llama   24      2048     16         5504   2048     32000   1,345,423,360

gpt2-small is the 163,009,536-parameter GPT-2 small trained from scratch in lowbit's DESIGN:
biases on LayerNorms and on every Linear except the fused QKV projection, untied head.
The arithmetic (d=768, L=12, V=50257, T=1024):
    token embedding + untied head    2·V·d               = 77,194,752
    position embedding               T·d                 =    786,432
    per layer: weights               12·d²               =  7,077,888
               LayerNorm w+b ×2      4·d                 =      3,072
               biases attn-out, fc, mlp-out  d + 4d + d  =      4,608
               (a QKV bias would add 3d = 2,304 per layer; LayerNorms without
               bias would remove 2d; no other bias layout lands on the total)
               per layer total                           =  7,085,568   (×12 = 85,026,816)
    final LayerNorm w+b              2·d                 =      1,536
    total                                                = 163,009,536

LLaMA shapes: the FP4 paper (Wang et al. 2025) trains LLaMA-2 1.3B/7B/13B and uses a 400M
LLaMA-2 for its direct-casting ablation; the paper's text gives sizes, not every shape, so
these are the standard shapes of those sizes with LLaMA-2's tokenizer vocabulary (32000),
context 2048, MHA (no GQA, as LLaMA-2 below 70B), untied head, SwiGLU rounded LLaMA-style:
  llama-1.3b: 24 layers × 2048 wide, 16 heads (head dim 128), SwiGLU 5504
              (= 128·ceil(int(8·2048/3)/128), multiple_of=128; the common "LLaMA 1.3B" shape,
              e.g. Sheared-LLaMA-1.3B) -> 1.345B parameters.
  llama-400m: 24 layers × 1024 wide, 16 heads (head dim 64), SwiGLU 2816 (multiple_of=256)
              -- the GPT-2-medium / Pythia-410M depth and width -> 374M parameters
              (341M without the token embedding; "400M" as such models are usually named).
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from lowbit.models.gpt import GPT, GPTConfig
from lowbit.models.llama import Llama, LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "PRESETS", "get_config", "build_model"]

PRESETS: dict[str, GPTConfig | LlamaConfig] = {
    # CPU-sized GPT-2 family: same layout as gpt2-small (no QKV bias, untied head).
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048, qkv_bias=False),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=2048, qkv_bias=False),
    "gpt2-small": GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True, qkv_bias=False
    ),
    # CPU-sized LLaMA-2 family.
    "llama-tiny": LlamaConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-small": LlamaConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=2048),
    # Below tiny, for tokens-per-parameter ladders a CPU can reach (`lowbit ladder`): D/N = 100 on llama-micro is
    # 10.7M tokens (non-embedding count), under one pass over the debian-docs corpus.
    "llama-nano": LlamaConfig(n_layer=1, n_head=2, n_embd=64, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-micro": LlamaConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=2048, multiple_of=32),
    "llama-mini": LlamaConfig(n_layer=3, n_head=3, n_embd=96, block_size=128, vocab_size=2048, multiple_of=32),
    # FP4-paper sizes (see module docstring for the shape choices).
    "llama-400m": LlamaConfig(n_layer=24, n_head=16, n_embd=1024, block_size=2048, vocab_size=32000),
    "llama-1.3b": LlamaConfig(
        n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=32000, multiple_of=128
    ),
}


def get_config(name: str, **overrides) -> GPTConfig | LlamaConfig:
    """Preset config by name, with any field overridden (e.g. vocab_size=4096, block_size=512)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return _replace(PRESETS[name], **overrides)


def build_model(name_or_config: str | GPTConfig | LlamaConfig, vocab_size: int | None = None, **overrides) -> nn.Module:
    """A freshly initialised model (fp32, on the CPU) from a preset name or a config.
    vocab_size (the tokenizer's) and any other config field can be overridden."""
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if isinstance(name_or_config, str):
        config = get_config(name_or_config, **overrides)
    elif isinstance(name_or_config, (GPTConfig, LlamaConfig)):
        config = _replace(name_or_config, **overrides)
    else:
        raise TypeError(
            f"build_model takes a preset name or a GPTConfig/LlamaConfig, got {type(name_or_config).__name__}"
        )
    return GPT(config) if isinstance(config, GPTConfig) else Llama(config)


def _replace(config, **overrides):
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {unknown}; valid fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **overrides) if overrides else config
