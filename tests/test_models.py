"""GPT-2 and LLaMA-2 model families: shapes, causality, parameter counts, KV-cache
generation, GQA, RoPE, init. Tiny configs only; the large presets are built on the
meta device (shapes, no memory)."""
import math

import pytest
import torch
import torch.nn as nn

from lowbit.flops import count_params
from lowbit.models import PRESETS, GPTConfig, LlamaConfig, build_model, get_config
from lowbit.models.base import KVCache
from lowbit.models.llama import RMSNorm, apply_rope, rope_cos_sin

FAMILIES = ["tiny", "llama-tiny"]


def _model(name, seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return build_model(name, **overrides).to(dtype).eval()


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_equals_analytic(name):
    with torch.device("meta"):  # no memory even for llama-1.3b
        model = build_model(name)
    want = count_params(model.config)
    assert model.num_params() == want["total"]
    assert model.num_params(non_embedding=True) == want["non_embedding"]


def test_gpt2_small_is_163_009_536_params():
    # d=768, L=12, V=50257, T=1024; biases on LayerNorms and on every Linear but QKV; untied head:
    #   token embedding + untied head  2·V·d = 2·50257·768          = 77,194,752
    #   position embedding             T·d   = 1024·768             =    786,432
    #   per layer  weights 12·d² = 7,077,888; LN w+b ×2 = 4·d = 3,072;
    #              biases attn-out d + fc 4d + mlp-out d = 6·d = 4,608  -> 7,085,568; ×12 = 85,026,816
    #   final LayerNorm w+b            2·d                          =      1,536
    #   total                          77,194,752 + 786,432 + 85,026,816 + 1,536 = 163,009,536
    with torch.device("meta"):
        model = build_model("gpt2-small")
    assert model.num_params() == 163_009_536
    # The same model with a QKV bias would be 12·3·768 = 27,648 larger: the layout is what pins the number.
    with torch.device("meta"):
        assert build_model("gpt2-small", qkv_bias=True).num_params() == 163_009_536 + 27_648


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", dict(bias=False)),
        ("tiny", dict(qkv_bias=True)),
        ("tiny", dict(tie_embeddings=True)),
        ("llama-tiny", dict(n_kv_head=2)),
        ("llama-tiny", dict(n_kv_head=1, tie_embeddings=True)),
        ("llama-tiny", dict(ffn_dim_multiplier=1.3)),
        ("llama-tiny", dict(intermediate_size=200)),
    ],
)
def test_variant_param_counts_equal_analytic(name, overrides):
    model = build_model(name, **overrides)
    want = count_params(model.config)
    assert model.num_params() == want["total"]
    assert model.num_params(non_embedding=True) == want["non_embedding"]


def test_weight_tying_shares_one_tensor():
    m = build_model("tiny", tie_embeddings=True)
    assert m.lm_head.weight is m.transformer.wte.weight
    untied = build_model("tiny")
    assert untied.num_params() - m.num_params() == 2048 * 128


def test_llama_ffn_rounding_matches_llama2_shapes():
    # LLaMA-2 7B / 13B published intermediate sizes, and the 1.3B/400M presets.
    assert LlamaConfig(n_embd=4096, n_head=32).ffn_hidden == 11008
    assert LlamaConfig(n_embd=5120, n_head=40).ffn_hidden == 13824
    assert get_config("llama-1.3b").ffn_hidden == 5504
    assert get_config("llama-400m").ffn_hidden == 2816
    # multiplier applied before rounding: int(1.3·int(8·128/3)) = int(1.3·341) = 443 -> 448 (multiple of 32)
    assert get_config("llama-tiny", ffn_dim_multiplier=1.3).ffn_hidden == 448


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name, per_layer", [("tiny", 4), ("llama-tiny", 7)])
def test_every_linear_is_plain_nn_linear(name, per_layer):
    # lowbit.convert swaps exact nn.Linear modules; nothing else may hide a GeMM.
    m = build_model(name)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert all(type(mod) is nn.Linear for mod in linears)
    assert len(linears) == per_layer * m.config.n_layer + 1
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.bias is None


def test_gpt2_small_bias_layout():
    with torch.device("meta"):
        m = build_model("gpt2-small")
    blk = m.transformer.h[0]
    assert blk.attn.c_attn.bias is None
    assert all(b is not None for b in (blk.attn.c_proj.bias, blk.mlp.c_fc.bias, blk.mlp.c_proj.bias, blk.ln_1.bias))


def test_llama_has_no_biases():
    m = build_model("llama-tiny")
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())


def test_gpt_init_scales():
    # Statistical check: 0.02 and 0.02/sqrt(2L) std. 65k samples per matrix -> the std
    # estimate's relative error is ~1/sqrt(2·65536) ≈ 0.3%; 5% is far outside noise.
    torch.manual_seed(0)
    m = build_model("tiny")
    L = m.config.n_layer
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert torch.all(m.transformer.h[0].mlp.c_fc.bias == 0)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes_and_loss(name):
    m = _model(name)
    idx = torch.randint(0, 2048, (3, 17))
    logits, loss = m(idx)
    assert logits.shape == (3, 17, 2048) and loss is None
    logits, loss = m(idx, idx)
    assert loss.shape == () and loss.dtype == torch.float32


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_at_init_is_ln_vocab(name):
    # With N(0, 0.02) weights the logits are ~N(0, σ²), σ ≈ 0.02·sqrt(d) ≈ 0.23 (the final
    # norm gives unit-variance features), so E[CE] ≈ ln V + σ²/2 ≈ ln V + 0.03. A tolerance of
    # 0.1 nats allows that offset and sampling noise but catches a mis-scaled head or init.
    m = _model(name)
    idx = torch.randint(0, 2048, (4, 64))
    _, loss = m(idx, torch.randint(0, 2048, (4, 64)))
    assert abs(loss.item() - math.log(2048)) < 0.1


@pytest.mark.parametrize("name", FAMILIES)
def test_ignore_index_minus_one(name):
    m = _model(name)
    idx = torch.randint(0, 2048, (2, 8))
    tgt = idx.clone()
    tgt[:, 4:] = -1
    logits, loss = m(idx, tgt)
    ref = nn.functional.cross_entropy(logits[:, :4].reshape(-1, 2048).float(), tgt[:, :4].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_masking(name):
    # Changing token t must leave logits at positions < t unchanged (up to float noise of
    # differently-shaped GeMMs: 1e-5 is 100x float32 rounding at these magnitudes) and
    # must change the logits at positions >= t (the test could fail).
    m = _model(name)
    idx = torch.randint(0, 2048, (2, 32))
    t = 20
    idx2 = idx.clone()
    idx2[:, t] = (idx[:, t] + 1) % 2048
    a, _ = m(idx)
    b, _ = m(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_backward_reaches_every_parameter(name):
    m = build_model(name)
    _, loss = m(torch.randint(0, 2048, (2, 16)), torch.randint(0, 2048, (2, 16)))
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_autocast_loss_close_to_fp32(name):
    # bf16 has an 8-bit significand (rel. error 2^-9 per op); through 4 layers the loss moves
    # by ~1e-3 nats. 0.02 catches a real precision bug (e.g. a bf16 softmax over the vocab).
    m = _model(name)
    idx = torch.randint(0, 2048, (2, 32))
    _, ref = m(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.02


@pytest.mark.parametrize("name", FAMILIES)
def test_too_long_input_raises(name):
    m = _model(name, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------- KV cache and generate


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_logits_equal_full_forward(name):
    # Prefill 5 tokens, then a 3-token chunk (needs the offset causal mask), then single tokens:
    # every step's logits must equal the full forward at those positions. float64 so the only
    # difference is summation order (~1e-15); 1e-9 leaves orders of magnitude of margin.
    m = _model(name, dtype=torch.float64, n_kv_head=2) if name == "llama-tiny" else _model(name, dtype=torch.float64)
    idx = torch.randint(0, 2048, (2, 12))
    full, _ = m(idx)
    caches = [KVCache(m.config.block_size) for _ in range(m.config.n_layer)]
    got = []
    for start, stop in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 12)]:
        got.append(m.lm_head(m._hidden(idx[:, start:stop], caches, start)))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-9, rtol=0)


def _reference_greedy(model, idx, n):
    """Brute force: full forward over the last block_size tokens, argmax, append."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_cache_equals_no_cache_across_block_crop(name):
    # block_size 16, prompt 5, 20 new tokens: the sequence passes block_size after 11 steps,
    # so both the cached phase and the cropped-window phase are exercised. float64 so that
    # argmax ties cannot flip on rounding.
    m = _model(name, dtype=torch.float64, block_size=16)
    prompt = torch.randint(0, 2048, (2, 5))
    ref = _reference_greedy(m, prompt, 20)
    cached = m.generate(prompt, 20, temperature=0.0, use_cache=True)
    uncached = m.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, ref) and torch.equal(uncached, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_is_reproducible_and_cache_independent(name):
    m = _model(name, dtype=torch.float64)
    prompt = torch.randint(0, 2048, (2, 4))
    outs = [
        m.generate(prompt, 10, temperature=0.8, top_k=20, use_cache=c, generator=torch.Generator().manual_seed(7))
        for c in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :4], prompt)
    # top_k=1 is greedy whatever the temperature.
    assert torch.equal(m.generate(prompt, 6, temperature=2.0, top_k=1), m.generate(prompt, 6, temperature=0.0))


def test_top_k_restricts_support():
    m = _model("tiny")
    prompt = torch.randint(0, 2048, (1, 4))
    logits, _ = m(prompt)
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = {m.generate(prompt, 1, temperature=5.0, top_k=3, generator=g)[0, -1].item() for _ in range(30)}
    assert draws <= allowed


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_k=0)])
def test_generate_rejects_bad_args(bad):
    m = _model("tiny")
    args = dict(max_new_tokens=2) | bad
    with pytest.raises(ValueError):
        m.generate(torch.zeros(1, 3, dtype=torch.long), **args)


# ---------------------------------------------------------------- GQA


def test_gqa_shapes_and_cache_holds_kv_heads():
    m = _model("llama-tiny", n_kv_head=2)
    hd = m.config.head_dim
    att = m.layers[0].attention
    assert att.wq.weight.shape == (4 * hd, 128) and att.wk.weight.shape == (2 * hd, 128)
    assert att.wv.weight.shape == (2 * hd, 128)
    caches = [KVCache(m.config.block_size) for _ in range(m.config.n_layer)]
    m._hidden(torch.randint(0, 2048, (3, 7)), caches, 0)
    assert caches[0].k.shape == (3, 2, m.config.block_size, hd)


def test_gqa_equals_mha_with_repeated_kv_heads():
    # Reference: an MHA model whose K/V projections are the GQA ones with each kv head's rows
    # repeated for the n_head/n_kv_head query heads it serves must compute the same logits.
    gqa = _model("llama-tiny", dtype=torch.float64, n_kv_head=2)
    mha = _model("llama-tiny", dtype=torch.float64)
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            sd[k] = sd[k].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 2048, (2, 10))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-10, rtol=0)  # float64: exact up to ~1e-15


# ---------------------------------------------------------------- RoPE, RMSNorm


def test_rope_is_the_closed_form_rotation():
    # head_dim 4: pairs (x0, x1) at frequency 1 and (x2, x3) at theta^(-1/2); position p rotates
    # pair i by p·freq_i: [x0 cos - x1 sin, x0 sin + x1 cos].
    theta, p = 10000.0, 3
    x = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    cos, sin = rope_cos_sin(4, torch.tensor([p]), theta, torch.float64)
    out = apply_rope(x, cos, sin)[0, 0, 0]
    x0, x1, x2, x3 = x[0, 0, 0]
    a, b = p * 1.0, p * theta**-0.5
    want = torch.stack(
        [
            x0 * math.cos(a) - x1 * math.sin(a),
            x0 * math.sin(a) + x1 * math.cos(a),
            x2 * math.cos(b) - x3 * math.sin(b),
            x2 * math.sin(b) + x3 * math.cos(b),
        ]
    )
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_rope_preserves_norms():
    x = torch.randn(2, 3, 50, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(32, torch.arange(50), dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    # <R_m q, R_n k> = <R_{m+s} q, R_{n+s} k> for any shift s.
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m, n):
        cq, sq = rope_cos_sin(32, torch.tensor([m]), dtype=torch.float64)
        ck, sk = rope_cos_sin(32, torch.tensor([n]), dtype=torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    base = score(7, 3)
    for s in (1, 10, 500):
        assert score(7 + s, 3 + s) == pytest.approx(base, abs=1e-9)
    assert abs(score(8, 3) - base) > 1e-6  # and it does depend on the offset


def test_rope_keeps_dtype_and_computes_in_fp32():
    x = torch.randn(1, 1, 8, 16).to(torch.bfloat16)
    cos, sin = rope_cos_sin(16, torch.arange(8))
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    ref = apply_rope(x.double(), cos.double(), sin.double())
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), atol=0, rtol=0)


def test_rmsnorm_closed_form():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6, dtype=torch.float64)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(norm(x), want)


# ---------------------------------------------------------------- configs and registry


def test_get_config_unknown_name_lists_presets():
    with pytest.raises(ValueError, match="tiny.*llama-1.3b"):
        get_config("gpt5")


def test_overrides_and_bad_fields():
    assert get_config("tiny", block_size=64).block_size == 64
    assert build_model("tiny", vocab_size=300).lm_head.out_features == 300
    with pytest.raises(ValueError, match="n_kv_head"):
        get_config("tiny", n_kv_head=2)  # a LLaMA field on a GPT config
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        LlamaConfig(n_head=4, n_embd=128, n_kv_head=3)
    with pytest.raises(TypeError):
        build_model(42)


def test_presets_are_immutable():
    with pytest.raises(Exception):
        PRESETS["tiny"].n_layer = 99


@pytest.mark.parametrize("name", FAMILIES)
def test_overfits_one_batch(name):
    # A working model + gradient path memorises one small batch quickly: 30 AdamW steps at
    # lr 3e-3 take the loss from ln(2048) ≈ 7.6 to well under 5 (a broken backward or a
    # mask that leaks the target would give no drop or a near-zero loss at step 0).
    torch.manual_seed(0)
    m = build_model(name).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 2048, (4, 32))
    y = torch.randint(0, 2048, (4, 32))
    first = None
    for _ in range(30):
        _, loss = m(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 7.0 and loss.item() < 5.0


def test_dropout_active_only_in_train_mode():
    m = _model("tiny", dropout=0.5)
    idx = torch.randint(0, 2048, (1, 8))
    torch.testing.assert_close(m(idx)[0], m(idx)[0], atol=0, rtol=0)  # eval: deterministic
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_attention_matches_fp64_reference(masked):
    """models.attention.sdpa on CPU bf16 inputs: fp32 math, one rounding of the output to bf16. Reference:
    softmax(q·kᵀ/√d + mask)·v in fp64 on the same bf16 inputs, rounded to bf16. fp32 vs fp64 math can move
    a value across a bf16 rounding boundary, so allow 1 bf16 ulp (2^-7 relative) plus a tiny atol for
    outputs near zero; gradients are checked the same way against fp64 autograd."""
    import torch.nn.functional as F

    from lowbit.models.attention import sdpa
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    kw = {"attn_mask": torch.ones(9, 9, dtype=torch.bool).tril()} if masked else {"is_causal": True}
    y = sdpa(q, k, v, **kw)
    assert y.dtype == torch.bfloat16
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, **kw)
    torch.testing.assert_close(y, ref.to(torch.bfloat16), rtol=2 ** -7, atol=1e-3)
    gy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(gy)
    ref.backward(gy.double())
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad, t64.grad.to(torch.bfloat16), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    """20,000 seeded draws from one row of logits: frequencies within 0.015 of softmax(logits / T)
    (binomial sd <= 0.0036 per token, so 0.015 is > 4 sd; logits * T would be off by > 0.1)."""
    from lowbit.models.base import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20_000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature, None, generator=g).view(-1)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    want = torch.softmax(logits[0].double() / temperature, dim=0)
    assert torch.allclose(freq, want, atol=0.015)


def test_a_new_family_is_one_registration(monkeypatch):
    """A family registered once (FAMILIES + its presets) is built, serialised, counted and reported everywhere:
    build_model, checkpoint metadata, lowbit.flops. Here a GPT with its own config class and parameter formula."""
    import dataclasses

    import lowbit.models as M
    from lowbit import flops
    from lowbit.models import gpt
    from lowbit.models.family import Family

    @dataclasses.dataclass(frozen=True)
    class EchoConfig(gpt.GPTConfig):
        pass

    class Echo(gpt.GPT):
        def __init__(self, config):
            super().__init__(dataclasses.replace(gpt.PRESETS["tiny"], **dataclasses.asdict(config)))
            self.config = config

    fam = Family("echo", "Echo family", EchoConfig, Echo, gpt.layer_params, {"echo-tiny": EchoConfig(
        n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100)})
    monkeypatch.setitem(M.FAMILIES, "echo", fam)
    monkeypatch.setitem(M.PRESETS, "echo-tiny", fam.presets["echo-tiny"])
    model = M.build_model("echo-tiny")
    assert type(model) is Echo and M.family_of(model.config) is fam
    d = M.config_to_dict(model.config)
    assert d["family"] == "echo" and M.config_from_dict(d) == model.config
    assert flops.count_params(model.config)["total"] == sum(p.numel() for p in model.parameters())
    assert "Echo family" in flops.format_report(model.config)
    with pytest.raises(TypeError, match="expected a model config"):
        M.family_of(object())
