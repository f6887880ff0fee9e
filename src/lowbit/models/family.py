"""Family: everything lowbit knows about one model family, in one entry (its module defines it, the registry
in lowbit.models.registry lists it). A new family is one module plus one line there.

    config, model      the config dataclass and the nn.Module it builds (`model(config)`)
    title              how reports name it ("GPT-2 family")
    presets            {preset name: config}
    layer_params       config -> (parameters per layer, embedding parameters, final-norm parameters), for
                       lowbit.flops.count_params (the GeMM FLOPs read the config's shared shape names)
    hf                 the Hugging Face mapping, or None when the family has no transformers counterpart
    params, flops, kv_elems   for families whose layers differ (mixture of experts, latent attention): config ->
                       lowbit.flops.count_params' dict (plus "active"); (config, seq_len) -> flops_per_token's dict;
                       config -> cached values per token. None: lowbit.flops' dense formulas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class HFMapping:
    """How a family maps onto a transformers architecture. The functions receive the `transformers` module
    (`tf`), so no family module imports transformers itself.

    architecture   the transformers class ("GPT2LMHeadModel"); model_type: its config's model_type ("gpt2")
    to_hf_config   (tf, config, special token ids dict) -> transformers config
    from_hf_config (transformers config) -> lowbit config (ValueError naming what lowbit cannot express)
    to_hf_state    (lowbit state_dict, config) -> transformers state_dict (names, layouts; values exact)
    from_hf_state  the inverse, for a lowbit model of `config`
    """

    architecture: str
    model_type: str
    to_hf_config: Callable[[Any, Any, dict], Any]
    from_hf_config: Callable[[Any], Any]
    to_hf_state: Callable[[dict, Any], dict]
    from_hf_state: Callable[[dict, Any], dict]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    config: type
    model: type
    layer_params: Callable[[Any], tuple[int, int, int]]
    presets: dict = field(default_factory=dict)
    hf: HFMapping | None = None
    params: Callable[[Any], dict] | None = None
    flops: Callable[[Any, int], dict] | None = None
    kv_elems: Callable[[Any], int] | None = None


def need(ok: bool, what: str) -> None:
    """ValueError for a Hugging Face config a lowbit family cannot express."""
    if not ok:
        raise ValueError(f"this Hugging Face model cannot be expressed as a lowbit model: {what}")
