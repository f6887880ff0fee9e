"""Model families and named presets: the registry.

A family (lowbit.models.family.Family) is one module that defines its config, its model, its presets, its
parameter formula and its Hugging Face mapping as `FAMILY`; FAMILIES below lists them, and everything else
(build_model, checkpoint metadata, lowbit.flops, lowbit.hf, export, the CLI's preset list) reads it.

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

from lowbit.models import deepseek, gpt, llama, llama4
from lowbit.models.family import Family
from lowbit.models.gpt import GPT, GPTConfig
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.suggest import did_you_mean

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "FAMILIES", "PRESETS", "family_of", "get_config",
           "build_model", "config_to_dict", "config_from_dict"]

FAMILIES: dict[str, Family] = {f.name: f for f in (gpt.FAMILY, llama.FAMILY, deepseek.FAMILY, llama4.FAMILY)}
PRESETS: dict = {name: cfg for f in FAMILIES.values() for name, cfg in f.presets.items()}
if len(PRESETS) != sum(len(f.presets) for f in FAMILIES.values()):
    raise RuntimeError("two model families define the same preset name; rename one")


def family_of(config) -> Family:
    """The Family whose config class is exactly `config`'s type (TypeError for anything else)."""
    for f in FAMILIES.values():
        if type(config) is f.config:
            return f
    names = "/".join(f.config.__name__ for f in FAMILIES.values())
    raise TypeError(f"expected a model config ({names}), got {type(config).__name__}")


def config_to_dict(config) -> dict:
    """{"family": name, **fields}: how checkpoints, exports and HF configs store a model config."""
    return {"family": family_of(config).name, **dataclasses.asdict(config)}


def config_from_dict(d: dict):
    """Inverse of config_to_dict (a dict without "family" is a GPT config: checkpoints before families)."""
    d = dict(d)
    name = d.pop("family", "gpt")
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} in saved metadata; known: {', '.join(FAMILIES)}")
    return FAMILIES[name].config(**d)


def get_config(name: str, **overrides):
    """Preset config by name, with any field overridden (e.g. vocab_size=4096, block_size=512)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}; known presets: "
                         f"{', '.join(PRESETS)} (`lowbit flops --list` shows their shapes)")
    return _replace(PRESETS[name], **overrides)


def build_model(name_or_config, vocab_size: int | None = None, **overrides) -> nn.Module:
    """A freshly initialised model (fp32, on the CPU) from a preset name or a config of any family.
    vocab_size (the tokenizer's) and any other config field can be overridden."""
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if isinstance(name_or_config, str):
        config = get_config(name_or_config, **overrides)
    else:
        config = _replace(name_or_config, **overrides) if dataclasses.is_dataclass(name_or_config) \
            else name_or_config
    try:
        family = family_of(config)
    except TypeError as e:
        raise TypeError(f"build_model takes a preset name or a model config: {e}") from None
    return family.model(config)


def _replace(config, **overrides):
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {unknown}; valid fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **overrides) if overrides else config
