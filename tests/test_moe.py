"""The deepseek family (lowbit.models.deepseek, moe, mla) against hand computations: routing, the balancing bias,
the sequence-wise loss, MLA against naive attention over the decompressed keys and values, the latent cache,
per-expert quantization, parameter and FLOP counts, and the trainer's wiring."""
from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit import flops
from lowbit.models import build_model, config_from_dict, config_to_dict
from lowbit.models.deepseek import DeepSeekConfig
from lowbit.models.llama import apply_rope, rope_cos_sin
from lowbit.models.moe import MoE, Router, balance_loss, run_experts
from lowbit.nn import QLinear


def test_router_picks_top_k_of_affinity_plus_bias_and_gates_with_the_affinity():
    r = Router(dim=3, n_experts=4, top_k=2, route_scale=2.0)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, 3))  # expert i's affinity is sigmoid(x_i), expert 3's sigmoid(0) = 0.5
        r.bias.copy_(torch.tensor([0.0, 0.0, 0.6, 0.0]))
    x = torch.tensor([[2.0, 1.0, -1.0]])
    s = torch.sigmoid(torch.tensor([2.0, 1.0, -1.0, 0.0]))
    with torch.no_grad():
        g, ids, aff = r(x)
    # s + b = [0.881, 0.731, 0.869, 0.5]: experts 0 and 2 chosen (2 only thanks to the bias) ...
    assert sorted(ids[0].tolist()) == [0, 2]
    # ... but gated by their affinities s (not s + b), normalised over the chosen, times route_scale
    want = {0: s[0] / (s[0] + s[2]) * 2, 2: s[2] / (s[0] + s[2]) * 2}
    for k in range(2):
        assert g[0, k] == pytest.approx(float(want[int(ids[0, k])]), rel=1e-6)
    torch.testing.assert_close(aff[0], s)


def test_bias_moves_towards_equal_load_and_is_checkpointed():
    r = Router(dim=4, n_experts=4, top_k=1)
    r.load.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    stats = r.update_bias(0.01)
    assert r.bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])  # overloaded down, underloaded up, mean stays
    assert stats["load_max_over_mean"] == pytest.approx(2.5) and r.load.sum() == 0
    model = build_model("deepseek-tiny", n_layer=2)
    model.moe_layers()[0].router.bias.fill_(0.25)
    sd = model.state_dict()
    assert torch.all(sd["layers.1.ffn.router.bias"] == 0.25)  # in the weights file: resume restores it
    assert "layers.1.ffn.router.load" not in sd


def test_balance_loss_by_hand():
    s = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5]])  # one sequence of 2 tokens, 3 experts, top-1
    ids = torch.tensor([[0], [1]])
    f = torch.tensor([1.0, 1.0, 0.0]) * 3 / (1 * 2)
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    assert float(balance_loss(s, ids, batch=1, top_k=1)) == pytest.approx(float((f * p).sum()), rel=1e-6)


def test_run_experts_is_the_gated_sum_and_each_expert_quantizes_its_own_rows():
    torch.manual_seed(0)
    moe = MoE(dim=32, hidden=32, n_routed=4, n_shared=0, top_k=2)
    lowbit.convert(moe, "fp8-tensor")  # per-tensor scales: each expert's own amax over its own tokens
    x = torch.randn(12, 32)
    g, ids, _ = moe.router(x)
    got = run_experts(moe.experts, x, g, ids)
    want = torch.zeros_like(x)
    for t in range(12):
        for k in range(2):
            e = int(ids[t, k])
            rows = (ids == e).any(1).nonzero().flatten()  # the tokens that expert e saw, in token order
            out = moe.experts[e](x[rows])
            want[t] += g[t, k] * out[(rows == t).nonzero().item()]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(isinstance(m, QLinear) for m in moe.experts[0].modules() if isinstance(m, torch.nn.Linear))


def test_an_expert_without_tokens_still_gets_a_zero_gradient():
    """DDP all-reduces every parameter's gradient: an expert no token chose must not leave it None."""
    torch.manual_seed(0)
    moe = MoE(dim=16, hidden=16, n_routed=4, n_shared=1, top_k=1)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # everything goes to expert 0
    moe(torch.randn(2, 5, 16)).sum().backward()
    assert all(p.grad is not None for p in moe.parameters() if p is not moe.router.weight)
    assert torch.count_nonzero(moe.experts[3].w1.weight.grad) == 0


def _naive_mla(attn, x, cos, sin):
    """Attention over the decompressed per-head keys and values, written out (no sdpa, no cache)."""
    B, T, _ = x.shape
    H, n, r, v = attn.n_head, attn.nope, attn.rope, attn.v_dim
    q = attn.wq(x).view(B, T, H, n + r).transpose(1, 2)
    q = torch.cat([q[..., :n], apply_rope(q[..., n:], cos, sin)], -1)
    c, kr = attn.wkv_a(x).split([attn.d_c, r], -1)
    kv = attn.wkv_b(attn.kv_norm(c)).view(B, T, H, n + v).transpose(1, 2)
    k = torch.cat([kv[..., :n], apply_rope(kr.unsqueeze(1), cos, sin).expand(B, H, T, r)], -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(n + r)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ kv[..., n:]
    return attn.wo(y.transpose(1, 2).reshape(B, T, H * v))


def test_mla_equals_naive_attention_and_its_cache_holds_only_the_latent():
    torch.manual_seed(0)
    model = build_model("deepseek-tiny", n_layer=2, vocab_size=64).double().eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 7, 256, dtype=torch.float64)
    cos, sin = rope_cos_sin(128, torch.arange(7), dtype=torch.float64)
    torch.testing.assert_close(attn(x, cos, sin), _naive_mla(attn, x, cos, sin), rtol=1e-10, atol=1e-10)
    from lowbit.models.base import KVCache

    cache = KVCache(16)
    attn(x, cos, sin, cache, 0)
    assert cache.k.shape == (2, 1, 16, 128) and cache.v.shape == (2, 1, 16, 128)  # latent d_c, RoPE key r
    idx = torch.randint(0, 64, (1, 5))
    a = model.generate(idx, 8, temperature=0.0, use_cache=True)
    b = model.generate(idx, 8, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_counts_match_the_built_model_and_the_hand_formula():
    c = DeepSeekConfig(n_layer=3, n_head=2, n_embd=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16, inter_dim=96, moe_inter_dim=32, n_routed_experts=4, n_shared_experts=1,
                       n_activated_experts=2, n_dense_layers=1, vocab_size=100)
    model = build_model(c)
    p = flops.count_params(c)
    assert p["total"] == sum(t.numel() for t in model.parameters())
    d, H = 64, 2
    attn = d * H * 24 + d * (32 + 8) + 32 + 32 * H * 32 + H * 16 * d
    moe_total, moe_active = 4 * d + (4 + 1) * 3 * d * 32, 4 * d + (2 + 1) * 3 * d * 32
    base = 2 * 100 * d + d + 3 * (attn + 2 * d) + 3 * d * 96
    assert (p["total"], p["active"]) == (base + 2 * moe_total, base + 2 * moe_active)
    f = flops.flops_per_token(c, 16)
    matmul = 3 * (attn - 32) + 3 * d * 96 + 2 * moe_active + 100 * d  # GeMM weights a token uses (no norms)
    assert f["matmul_params"] == matmul
    assert f["forward"] == 2 * (matmul - 100 * d) + 3 * (2 * 16 * H * 24 + 2 * 16 * H * 16) + 2 * d * 100
    assert flops.kv_cache_bytes(c, 2) == 3 * (32 + 8) * 2  # the latent and the RoPE key per layer


def test_config_round_trip_and_bad_shapes():
    c = build_model("deepseek-tiny").config
    assert config_from_dict(config_to_dict(c)) == c
    with pytest.raises(ValueError, match="n_activated_experts=9 exceeds the 8 routed experts"):
        DeepSeekConfig(n_activated_experts=9)
    with pytest.raises(ValueError, match="kv_lora_rank=128 is not below n_embd=128"):
        DeepSeekConfig(kv_lora_rank=128)


def test_the_trainer_moves_the_bias_and_logs_the_load(tmp_path):
    from conftest import write_corpus
    from lowbit.train import TrainConfig, train

    corpus = write_corpus(tmp_path, "kings")
    res = train(TrainConfig(model="deepseek-tiny", data=str(corpus), tokenizer="bytes", tokens=3 * 4 * 32,
                            batch_size=4, seq_len=32, device="cpu", log_interval=1, eval_interval=100,
                            out=str(tmp_path / "run")), progress=False)
    assert all(row["moe_load_max_over_mean"] >= 1.0 for row in res.history)
    from lowbit.train import weights

    sd = weights.read_weights(sorted((tmp_path / "run" / "ckpt").glob("step_*"))[-1])
    bias = sd["layers.1.ffn.router.bias"]
    assert torch.count_nonzero(bias) > 0 and torch.allclose(bias.abs() / 1e-3, torch.round(bias.abs() / 1e-3))


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_transformers_deepseek_v3_computes_the_same_logits(q_lora_rank):
    # transformers' own DeepseekV3ForCausalLM (an independent MLA + DeepSeekMoE) on the exported weights, with a
    # nonzero balancing bias (its e_score_correction_bias). Bug caught: a RoPE layout, gate/up half, bias or
    # latent-norm mapping that differs (the logits would move by far more than fp32 rounding).
    pytest.importorskip("transformers")
    from lowbit.hf import from_hf, hf_config, to_hf

    torch.manual_seed(0)
    m = build_model("deepseek-tiny", block_size=64, vocab_size=300, q_lora_rank=q_lora_rank).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.router.bias.normal_(0, 0.01)
    hf = to_hf(m, eot_id=0)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(0, 300, (2, 40))
    torch.testing.assert_close(hf(x).logits, m(x)[0], rtol=1e-5, atol=2e-6)  # fp32, different op order
    assert torch.equal(from_hf(hf)(x)[0], m(x)[0])
    with pytest.raises(ValueError, match="multi-token prediction"):
        hf_config(build_model("deepseek-tiny", mtp_depth=1).config)


def test_block_selections_count_transformer_blocks_not_experts():
    """share:16% on deepseek-tiny kept expert 7 of layer 1 (the experts list, 8 long, outnumbered the 4 blocks);
    the blocks are the outermost list."""
    from lowbit.nn.select import block_list, high_precision_names

    model = build_model("deepseek-tiny")
    assert block_list(model) == ("layers", 4)
    kept = high_precision_names(model, ("share:16%",))
    assert "layers.3.attn.wo" in kept and not any(k.startswith("layers.1.") for k in kept)


def test_flops_report_puts_mla_cache_beside_mha():
    # deepseek-tiny by hand: MLA caches 4 layers × (d_c 128 + RoPE key 128) × 2 bytes = 2,048 bytes/token; MHA
    # with its 2 heads would cache 4 × 2 × (K 64+128 + V 64) × 2 = 4,096. Bug caught: V counted at the key's width.
    text = flops.format_report(build_model("deepseek-tiny").config, name="deepseek-tiny")
    assert "KV cache (bf16): 2,048 bytes/token" in text and "would cache 4,096 bytes/token, 2.0x" in text


def test_mtp_predicts_the_token_after_next_from_the_shifted_embedding():
    # D = 2 by hand: depth k reads h_{k-1}[i] and Emb(x[i+k]) and is scored on y[i+k] = x[i+k+1]; the training
    # loss is main + λ · mean of the two; evaluation sees the main loss only. Bug caught: depth k scored on y[i+1]
    # (the main model's target) or fed Emb(x[i]).
    import torch.nn.functional as F

    c = DeepSeekConfig(n_layer=2, n_head=2, n_embd=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16, inter_dim=96, moe_inter_dim=32, n_routed_experts=4, n_activated_experts=2,
                       vocab_size=50, block_size=16, mtp_depth=2, mtp_lambda=0.5, seq_aux_alpha=0.0)
    torch.manual_seed(0)
    m = build_model(c)
    x = torch.randint(0, 50, (2, 10))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -1
    m.eval()
    _, main = m(x, y)
    h, cos, sin = m._trunk(x)
    want = []
    for k, mod in enumerate(m.mtp, 1):
        h = mod(h[:, :10 - k], m.embed(x[:, k:]), cos[:10 - k], sin[:10 - k])
        tgt = torch.cat([x[:, k + 1:], torch.full((2, 1), -1)], 1)  # token i+k+1 (none past the end)
        want.append(F.cross_entropy(m.lm_head(mod.norm(h)).reshape(-1, 50), tgt.reshape(-1), ignore_index=-1))
    m.train()
    _, total = m(x, y)
    torch.testing.assert_close(total, main + 0.5 * (want[0] + want[1]) / 2)
    assert flops.count_params(c)["total"] == sum(p.numel() for p in m.parameters())
    assert flops.count_params(c)["active"] == flops.count_params(dataclasses_replace(c, mtp_depth=0))["active"]


def dataclasses_replace(c, **kw):
    import dataclasses
    return dataclasses.replace(c, **kw)


def test_delayed_scaling_expert_without_tokens():
    # an expert no token chose gets an empty batch; under delayed scaling that is no observation: the call works
    # (forward and backward) and its amax histories stay as they were. Bug caught: amax() of an empty tensor
    # raising (every MoE run under fp8-tensor-delayed failed: bench/moe_recipes.py found it).
    from lowbit.models.moe import SwiGLU

    expert = lowbit.convert(SwiGLU(16, 32), "fp8-tensor-delayed")
    x = torch.randn(5, 16)
    expert(x).sum().backward()
    layers = [m for m in expert.modules() if isinstance(m, QLinear)]
    before = [m.qstate.quant_state_dict()["buffers"] for m in layers]  # commits the first call
    assert all("amax_history_input" in b for b in before)  # delayed scaling: histories exist
    empty = torch.zeros(0, 16, requires_grad=True)
    y = expert(empty)
    y.sum().backward()
    assert y.shape == (0, 16) and empty.grad.shape == (0, 16)
    for m, b in zip(layers, before):
        after = m.qstate.quant_state_dict()["buffers"]
        acts = [k for k in b if not k.endswith("_weight")]  # the weight is observed on every call, rightly
        assert acts and all(torch.equal(after[k], b[k]) and b[k].abs().sum() > 0 for k in acts)
