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

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.data.tokenizer import EOT, Tokenizer
from lowbit.models import GPT, GPTConfig, Llama, LlamaConfig, build_model

_LOWBIT_KEY = "lowbit_model_config"
_GPT_PROJ = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # nn.Linear in lowbit, Conv1D in HF
_LLAMA_NAMES = {  # lowbit per-layer name -> HF per-layer name
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("this needs Hugging Face transformers: pip install 'lowbit[hf]'") from None
    return transformers


# --- configs ------------------------------------------------------------------------------------------

def _config_dict(config) -> dict:
    return {"family": config.family, **dataclasses.asdict(config)}


def _config_from_dict(d: dict):
    d = dict(d)
    cls = {"gpt": GPTConfig, "llama": LlamaConfig}[d.pop("family")]
    return cls(**d)


def hf_config(config: GPTConfig | LlamaConfig, eot_id: int | None = None):
    """The transformers config (GPT2Config or LlamaConfig) of a lowbit model config."""
    tf = _transformers()
    special = {} if eot_id is None else {"bos_token_id": eot_id, "eos_token_id": eot_id}
    if isinstance(config, GPTConfig):
        c = tf.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ffn_hidden,
                          activation_function="gelu", resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                          attn_pdrop=config.dropout, layer_norm_epsilon=1e-5,
                          tie_word_embeddings=config.tie_embeddings, **special)
    elif isinstance(config, LlamaConfig):
        c = tf.LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                           intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer,
                           num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads,
                           head_dim=config.head_dim, max_position_embeddings=config.block_size,
                           rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, hidden_act="silu",
                           attention_bias=False, mlp_bias=False, attention_dropout=config.dropout,
                           tie_word_embeddings=config.tie_embeddings, **special)
    else:
        raise TypeError(f"hf_config needs a GPTConfig or LlamaConfig, got {type(config).__name__}")
    setattr(c, _LOWBIT_KEY, _config_dict(config))
    return c


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"this Hugging Face model cannot be expressed as a lowbit model: {what}")


def lowbit_config(hf_cfg) -> GPTConfig | LlamaConfig:
    """The lowbit config of a transformers GPT2Config / LlamaConfig: the exact one stored by lowbit's
    export when present, else mapped field by field (ValueError naming what lowbit cannot express)."""
    d = getattr(hf_cfg, _LOWBIT_KEY, None)
    if d:
        return _config_from_dict(d)
    mt = getattr(hf_cfg, "model_type", None)
    tie = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    if mt == "gpt2":
        act = hf_cfg.activation_function
        _need(act == "gelu", f"activation_function={act!r}; lowbit's GPT uses exact GELU ('gelu')")
        _need(hf_cfg.n_inner in (None, 4 * hf_cfg.n_embd), f"n_inner={hf_cfg.n_inner}; lowbit's MLP is 4×n_embd")
        _need(abs(hf_cfg.layer_norm_epsilon - 1e-5) < 1e-12,
              f"layer_norm_epsilon={hf_cfg.layer_norm_epsilon}; lowbit's LayerNorm uses 1e-5")
        _need(not hf_cfg.scale_attn_by_inverse_layer_idx and hf_cfg.scale_attn_weights,
              "attention scaling other than 1/sqrt(head_dim)")
        return GPTConfig(block_size=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.n_layer,
                         n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd, dropout=float(hf_cfg.resid_pdrop),
                         bias=True, qkv_bias=True, tie_embeddings=tie)
    if mt == "llama":
        _need(hf_cfg.hidden_act == "silu", f"hidden_act={hf_cfg.hidden_act!r}; lowbit's Llama uses SwiGLU (silu)")
        _need(not hf_cfg.attention_bias and not getattr(hf_cfg, "mlp_bias", False), "biased projections")
        hd = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        _need(hd * hf_cfg.num_attention_heads == hf_cfg.hidden_size,
              f"head_dim={hd} × {hf_cfg.num_attention_heads} heads != hidden_size={hf_cfg.hidden_size}")
        rope = dict(getattr(hf_cfg, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
        _need(rope.get("rope_type", "default") == "default" and not getattr(hf_cfg, "rope_scaling", None)
              or rope.get("rope_type") == "default",
              f"RoPE scaling {rope.get('rope_type')!r}; lowbit implements plain RoPE")
        return LlamaConfig(block_size=hf_cfg.max_position_embeddings, vocab_size=hf_cfg.vocab_size,
                           n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads,
                           n_embd=hf_cfg.hidden_size, n_kv_head=hf_cfg.num_key_value_heads,
                           intermediate_size=hf_cfg.intermediate_size, norm_eps=float(hf_cfg.rms_norm_eps),
                           rope_theta=float(theta), dropout=float(getattr(hf_cfg, "attention_dropout", 0.0)),
                           tie_embeddings=tie)
    raise ValueError(f"lowbit maps only GPT-2 and Llama models to its own families, got model_type={mt!r}; "
                     "use lowbit.convert(model, recipe) to train it as a Hugging Face model instead")


# --- weights --------------------------------------------------------------------------------------------

def _rope_perm(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order taking lowbit's interleaved-pair q/k rows to HF's half-split layout, per head."""
    per_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig | LlamaConfig) -> dict[str, torch.Tensor]:
    """lowbit state_dict -> the matching transformers model's state_dict (names, layouts; values exact)."""
    out = {}
    if isinstance(config, GPTConfig):
        d = config.n_embd
        for k, v in sd.items():
            out[k] = v.t().contiguous() if k.endswith(".weight") and any(f".{p}." in k for p in _GPT_PROJ) else v
        zeros = {"attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d, "mlp.c_fc.bias": config.ffn_hidden,
                 "mlp.c_proj.bias": d, "ln_1.bias": d, "ln_2.bias": d}
        for i in range(config.n_layer):
            for name, n in zeros.items():
                out.setdefault(f"transformer.h.{i}.{name}", sd["transformer.wte.weight"].new_zeros(n))
        out.setdefault("transformer.ln_f.bias", sd["transformer.wte.weight"].new_zeros(d))
        return out
    hd = config.head_dim
    perm_q, perm_k = _rope_perm(config.n_head, hd), _rope_perm(config.kv_heads, hd)
    for k, v in sd.items():
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            _, i, rest = k.split(".", 2)
            if rest == "attention.wq.weight":
                v = v[perm_q]
            elif rest == "attention.wk.weight":
                v = v[perm_k]
            out[f"model.layers.{i}.{_LLAMA_NAMES[rest]}"] = v
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig | LlamaConfig) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict for a lowbit model of `config` (biases lowbit does not have must be 0)."""
    out = {}
    if isinstance(config, GPTConfig):
        want_bias = {"attn.c_attn.bias": config.use_qkv_bias, "attn.c_proj.bias": config.bias,
                     "mlp.c_fc.bias": config.bias, "mlp.c_proj.bias": config.bias,
                     "ln_1.bias": config.bias, "ln_2.bias": config.bias, "ln_f.bias": config.bias}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):  # old HF causal-mask buffers
                continue
            suffix = next((s for s in want_bias if k.endswith("." + s)), None)
            if suffix is not None and not want_bias[suffix]:
                if torch.count_nonzero(v):
                    raise ValueError(f"{k} is nonzero but the lowbit config has no such bias; "
                                     "load it into a config with bias=True / qkv_bias=True")
                continue
            out[k] = v.t().contiguous() if k.endswith(".weight") and any(f".{p}." in k for p in _GPT_PROJ) else v
        return out
    inv = {v: k for k, v in _LLAMA_NAMES.items()}
    hd = config.head_dim
    inv_q = torch.argsort(_rope_perm(config.n_head, hd))
    inv_k = torch.argsort(_rope_perm(config.kv_heads, hd))
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = v
        elif k == "model.norm.weight":
            out["norm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif k.startswith("model.layers.") and not k.endswith("rotary_emb.inv_freq"):
            _, _, i, rest = k.split(".", 3)
            name = inv[rest]
            if name == "attention.wq.weight":
                v = v[inv_q]
            elif name == "attention.wk.weight":
                v = v[inv_k]
            out[f"layers.{i}.{name}"] = v
    return out


def _load_exact(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """load_state_dict, tolerating only a tied head's missing/duplicate key."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"}
    if set(missing) - tied or set(unexpected) - tied:
        raise ValueError(f"weight mapping mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def to_hf(model: GPT | Llama, eot_id: int | None = None) -> nn.Module:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM (fp32, eval mode) with `model`'s weights (the
    high-precision master weights: a converted model's QLinear layers export like nn.Linear)."""
    tf = _transformers()
    cfg = hf_config(model.config, eot_id)
    hf = tf.AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    _load_exact(hf, to_hf_state_dict(sd, model.config))
    return hf.eval()


def from_hf(hf_model: nn.Module) -> GPT | Llama:
    """The lowbit model (fp32, CPU) of a transformers GPT-2 / Llama model, same weights and logits."""
    config = lowbit_config(hf_model.config)
    model = build_model(config)
    sd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    _load_exact(model, from_hf_state_dict(sd, config))
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
    tf = _transformers()
    if tok.kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_str(tok._hf.to_str())  # a copy: lowbit's object stays as it is
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

def save_pretrained(model: GPT | Llama, tok: Tokenizer, out: str | os.PathLike, dtype: torch.dtype = torch.float32
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


def load_pretrained(path: str | os.PathLike) -> tuple[GPT | Llama, Tokenizer]:
    """(lowbit model in fp32 on the CPU, lowbit Tokenizer) from a Hugging Face GPT-2 / Llama directory,
    offline (e.g. one written by `lowbit export --to hf`); for `lowbit train --init-from`."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a Hugging Face model directory (no config.json); "
                                "pass a directory written by `lowbit export --to hf` or save_pretrained")
    tf = _transformers()
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
