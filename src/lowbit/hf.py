"""Hugging Face `transformers` glue: lowbit models <-> GPT2LMHeadModel / LlamaForCausalLM, tokenizers, and a
small adapter so lowbit-style training loops can drive any causal LM.

    from lowbit.hf import to_hf, from_hf, hf_tokenizer, load_pretrained
    hf_model = to_hf(lowbit_model)                   # same logits (fp32), HF module names and layouts
    model = from_hf(hf_model)                        # back to lowbit (GPT or Llama), exact weights
    model, tok = load_pretrained("DIR")              # a saved HF directory -> lowbit model + lowbit Tokenizer

Weight mapping (lowbit -> HF); every tensor is copied exactly (values never change, only layout):
  GPT (-> GPT2LMHeadModel): same module names; the four projections are HF `Conv1D` ([in, out], the
    transpose of lowbit's nn.Linear [out, in]). lowbit's missing biases (`bias=False`, `qkv_bias=False`)
    become zero biases, which add nothing, so every GPTConfig is expressible. GELU is exact
    (`activation_function="gelu"`, not GPT-2's tanh "gelu_new"). The head stays untied unless the
    lowbit model ties it.
  Llama (-> LlamaForCausalLM): tok_embeddings -> model.embed_tokens, layers.i.attention.wq/wk/wv/wo ->
    model.layers.i.self_attn.q/k/v/o_proj, feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj,
    attention_norm / ffn_norm -> input_layernorm / post_attention_layernorm, norm -> model.norm.
    RoPE: lowbit rotates adjacent pairs (x[2i], x[2i+1]) (Meta's layout); HF's rotate_half rotates
    (x[i], x[i + hd/2]) at the same frequency i. Permuting the rows of wq and wk within each head by
    [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other (q·k is unchanged because q and k get the same
    permutation); wv/wo are not touched.
The exported config carries `lowbit_model_config` (the exact lowbit config), so an export -> import round
trip restores the same lowbit model; HF directories without it are mapped field by field and anything
lowbit's models cannot express (e.g. GPT-2's tanh GELU, biased Llama projections) raises ValueError.

Nothing here downloads: models are built from configs, tokenizers from lowbit's own `tokenizers` object.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.data.tokenizer import EOT, Tokenizer
from lowbit.models import FAMILIES, build_model, config_from_dict, config_to_dict, family_of
from lowbit.models.base import CausalLM

_LOWBIT_KEY = "lowbit_model_config"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("this needs Hugging Face transformers: pip install 'lowbit[hf]' (or pip install "
                          "transformers accelerate)") from None
    return transformers


def _mapping(config):
    """The family's HFMapping (ValueError when the family has no transformers counterpart)."""
    family = family_of(config)
    if family.hf is None:
        raise ValueError(f"the {family.name} family has no Hugging Face mapping yet (lowbit maps "
                         f"{', '.join(f.name for f in FAMILIES.values() if f.hf)}); keep it as a lowbit run "
                         "(lowbit eval and generate read it)")
    return family.hf


# --- configs ------------------------------------------------------------------------------------------

def hf_config(config, eot_id: int | None = None):
    """The transformers config (GPT2Config, LlamaConfig, ...) of a lowbit model config."""
    special = {} if eot_id is None else {"bos_token_id": eot_id, "eos_token_id": eot_id}
    c = _mapping(config).to_hf_config(require_transformers(), config, special)
    setattr(c, _LOWBIT_KEY, config_to_dict(config))
    return c


def lowbit_config(hf_cfg):
    """The lowbit config of a transformers config: the exact one stored by lowbit's export when present, else
    mapped field by field by the family whose model_type it has (ValueError naming what lowbit cannot express)."""
    d = getattr(hf_cfg, _LOWBIT_KEY, None)
    if d:
        return config_from_dict(d)
    mt = getattr(hf_cfg, "model_type", None)
    for family in FAMILIES.values():
        if family.hf is not None and family.hf.model_type == mt:
            return family.hf.from_hf_config(hf_cfg)
    known = ", ".join(f.hf.model_type for f in FAMILIES.values() if f.hf is not None)
    raise ValueError(f"lowbit maps only these Hugging Face model types to its own families: {known}; got "
                     f"model_type={mt!r}; use lowbit.convert(model, recipe) to train it as a Hugging Face model")


def architecture(config) -> str:
    """The transformers class a lowbit model of `config` exports to ("GPT2LMHeadModel", ...)."""
    return _mapping(config).architecture


# --- weights --------------------------------------------------------------------------------------------

def to_hf_state_dict(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """lowbit state_dict -> the matching transformers model's state_dict (names, layouts; values exact)."""
    return _mapping(config).to_hf_state(sd, config)


def from_hf_state_dict(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict for a lowbit model of `config` (biases lowbit does not have must be 0)."""
    return _mapping(config).from_hf_state(sd, config)


def load_exact(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """load_state_dict, tolerating only a tied head's missing/duplicate key."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"}
    if set(missing) - tied or set(unexpected) - tied:
        raise ValueError(f"weight mapping mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def to_hf(model: CausalLM, eot_id: int | None = None) -> nn.Module:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM (fp32, eval mode) with `model`'s weights (the
    high-precision master weights: a converted model's QLinear layers export like nn.Linear)."""
    tf = require_transformers()
    cfg = hf_config(model.config, eot_id)
    hf = tf.AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    load_exact(hf, to_hf_state_dict(sd, model.config))
    return hf.eval()


def from_hf(hf_model: nn.Module) -> CausalLM:
    """The lowbit model (fp32, CPU) of a transformers GPT-2 / Llama model, same weights and logits."""
    config = lowbit_config(hf_model.config)
    model = build_model(config)
    sd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    load_exact(model, from_hf_state_dict(sd, config))
    return model


# --- tokenizers ------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bytes_backend():
    """lowbit's bytes tokenizer (id = byte value, end-of-text 256) as a tokenizers BPE with no merges."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOT] = 256
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return hf


def hf_tokenizer(tok: Tokenizer):
    """lowbit's Tokenizer as a transformers PreTrainedTokenizerFast (same ids for any text without the
    literal end-of-text string; `<|endoftext|>` is its bos/eos/unk token, as in GPT-2)."""
    tf = require_transformers()
    if tok.kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_str(tok.backend_json())  # a copy: lowbit's object stays as it is
    else:
        backend = _bytes_backend()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                      model_max_length=int(1e30))


def tokenizer_from_dir(path: str | os.PathLike) -> Tokenizer:
    """A lowbit Tokenizer from a directory: lowbit's own files if present, else a Hugging Face
    `tokenizer.json` (a byte-level BPE with an `<|endoftext|>` token, as GPT-2's)."""
    d = Path(path)
    if (d / "lowbit_tokenizer.json").is_file():
        return Tokenizer.load(d)
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d} has no tokenizer.json; save the tokenizer there "
                                "(tokenizer.save_pretrained(DIR)) or pass --tokenizer")
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    if hf.token_to_id(EOT) is None:
        raise ValueError(f"the tokenizer in {d} has no {EOT!r} token; lowbit separates documents with it "
                         "(use a GPT-2-style byte-level BPE tokenizer)")
    return Tokenizer("bpe", hf)


# --- directories -------------------------------------------------------------------------------------------

def save_pretrained(model: CausalLM, tok: Tokenizer, out: str | os.PathLike, dtype: torch.dtype = torch.float32
                    ) -> Path:
    """Write `model` and `tok` as a Hugging Face directory (config.json, model.safetensors, tokenizer
    files, plus lowbit's tokenizer metadata) that AutoModelForCausalLM / AutoTokenizer load offline."""
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer vocabulary {tok.vocab_size} exceeds the model's {model.config.vocab_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model, tok.eot_id).to(dtype)
    hf.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(tok).save_pretrained(out)
    tok.save_meta(out)  # lowbit's Tokenizer.load reads this plus (BPE) the tokenizer.json written above
    return out


def load_pretrained(path: str | os.PathLike) -> tuple[CausalLM, Tokenizer]:
    """(lowbit model in fp32 on the CPU, lowbit Tokenizer) from a Hugging Face GPT-2 / Llama directory,
    offline (e.g. one written by `lowbit export --to hf`); for `lowbit train --init-from`."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a Hugging Face model directory (no config.json); "
                                "pass a directory written by `lowbit export --to hf` or save_pretrained")
    tf = require_transformers()
    hf = tf.AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32)
    model = from_hf(hf)
    tok = tokenizer_from_dir(d)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {d} has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    return model, tok


# --- training adapter ----------------------------------------------------------------------------------------

class CausalLMAdapter(nn.Module):
    """Any transformers causal LM with lowbit's model interface, `forward(idx [B, T], targets [B, T] | None)
    -> (logits [B, T, V], loss | None)` (next-token targets already shifted, as lowbit's Batcher gives
    them; loss in fp32), so lowbit-style loops (Batcher, the recipe's autocast, clipping, AdamW) train it
    after `lowbit.convert(adapter.hf, recipe)`."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx).logits
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                               ignore_index=-1)
        return logits, loss
