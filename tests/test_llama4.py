"""The llama4 family (lowbit.models.llama4) against hand computations: top-1 routing with the sigmoid gate on the
expert's input, the dense/MoE and RoPE/NoPE layer patterns, QK-norm, parameter counts, the cache, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit import flops
from lowbit.models import build_model, config_from_dict, config_to_dict, get_config
from lowbit.models.llama4 import Llama4Attention, Llama4Config
from lowbit.models.moe import MoE


def small(**kw) -> Llama4Config:
    base = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=16, intermediate_size_mlp=48,
                n_experts=4, vocab_size=50, block_size=32)
    return Llama4Config(**{**base, **kw})


def test_moe_is_shared_plus_the_top1_expert_of_the_gated_input():
    # by hand: logits l = x·Wᵀ, i = argmax l, y = shared(x) + expert_i(sigmoid(l_i) · x). Bug caught: the gate
    # applied to the expert's output (DeepSeek's order; different through the SwiGLU) or normalised to 1.
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 1, 1, normalize=False, gate_input=True).eval()
    x = torch.randn(1, 6, 16)
    flat = x[0]
    logits = flat @ moe.router.weight.T
    want = []
    for t in range(6):
        i = int(logits[t].argmax())
        want.append(moe.shared(flat[t]) + moe.experts[i](torch.sigmoid(logits[t, i]) * flat[t]))
    torch.testing.assert_close(moe(x)[0], torch.stack(want), rtol=1e-5, atol=1e-6)


def test_layer_patterns_follow_the_config():
    c = small(n_layer=8)
    assert [c.uses_rope(i) for i in range(8)] == [True, True, True, False] * 2  # every 4th layer NoPE
    assert [c.is_moe(i) for i in range(8)] == [False, True] * 4  # Maverick: dense and MoE alternate
    assert all(small(interleave_moe_layer_step=1).is_moe(i) for i in range(4))  # Scout: every layer
    m = build_model(c)
    assert [isinstance(b.feed_forward, MoE) for b in m.layers] == [False, True] * 4
    assert [b.attention.rope for b in m.layers] == [True, True, True, False] * 2


def _attn(layer: int, **kw) -> Llama4Attention:
    torch.manual_seed(1)
    return Llama4Attention(small(**kw), layer).eval()


def _cos_sin(T: int, hd: int = 8):
    from lowbit.models.llama import rope_cos_sin
    return rope_cos_sin(hd, torch.arange(T), 500000.0)


def test_nope_layer_sees_no_positions_and_rope_layer_does():
    # causal attention without positions: the last token's output depends on the set of earlier tokens, not their
    # order. Bug caught: RoPE applied in the NoPE layer (or skipped in a RoPE layer).
    x = torch.randn(1, 7, 32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2, 6])  # the last token stays last
    cos, sin = _cos_sin(7)
    nope, rope = _attn(3), _attn(0)
    torch.testing.assert_close(nope(x, cos, sin)[0, -1], nope(x[:, perm], cos, sin)[0, -1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rope(x, cos, sin)[0, -1], rope(x[:, perm], cos, sin)[0, -1], atol=1e-4)


def test_qk_norm_and_temperature_tuning():
    # QK-norm: scaling wq and wk leaves a RoPE layer unchanged (bug caught: no norm on q/k). Temperature tuning:
    # the identity below floor_scale positions; with floor_scale=2, position p's queries scale by
    # 1 + 0.1·log(1 + floor((p+1)/2)), checked against scaling wq's rows in a layer without tuning.
    x = torch.randn(1, 5, 32)
    cos, sin = _cos_sin(5)
    a = _attn(0)
    y = a(x, cos, sin)
    with torch.no_grad():
        a.wq.weight.mul_(7.0)
        a.wk.weight.mul_(3.0)  # both up: RMSNorm's eps (1e-5) stays negligible against q·q and k·k
    torch.testing.assert_close(a(x, cos, sin), y, rtol=1e-4, atol=1e-5)
    plain, tuned = _attn(3, attn_temperature_tuning=False), _attn(3)
    torch.testing.assert_close(tuned(x, cos, sin), plain(x, cos, sin))
    tuned2 = _attn(3, floor_scale=2)
    with torch.no_grad():
        q = plain.wq(x).view(1, 5, 4, 8).transpose(1, 2)
    scale = 1 + 0.1 * torch.log1p(torch.floor((torch.arange(5.0) + 1) / 2))
    k = plain.wk(x).view(1, 5, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = plain.wv(x).view(1, 5, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    att = F.scaled_dot_product_attention(q * scale.view(1, 1, 5, 1), k, v, is_causal=True)
    want = plain.wo(att.transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(tuned2(x, cos, sin), want, rtol=1e-4, atol=1e-5)


def test_counts_match_the_built_model_and_the_hand_formula():
    # llama4-tiny by hand: d 256, V 2048, 4 layers (attention 2·d² + 2·d·128 each), layers 0 and 2 dense
    # (3·256·512), layers 1 and 3 MoE (router 8·256, 8 routed + 1 shared experts of 3·256·128; one routed active).
    c = get_config("llama4-tiny")
    attn, dense, expert = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 256, 3 * 256 * 512, 3 * 256 * 128
    base = 2 * 2048 * 256 + 256 + 4 * attn + 2 * dense
    p = flops.count_params(c)
    assert (p["total"], p["active"]) == (base + 2 * (8 * 256 + 9 * expert), base + 2 * (8 * 256 + 2 * expert))
    assert p["total"] == sum(t.numel() for t in build_model(c).parameters())
    assert flops.kv_cache_bytes(c, 2) == 4 * 2 * 2 * 64 * 2  # GQA: 2 kv heads of 64 per layer, K and V
    scout = flops.count_params(get_config("llama4-scout"))  # Meta: 17B active, 109B total with the vision tower
    assert 17.0e9 < scout["active"] < 17.3e9 and 107e9 < scout["total"] < 109e9


def test_cache_generation_equals_no_cache_and_config_round_trip():
    m = build_model(small(n_layer=4)).eval()
    idx = torch.randint(0, 50, (1, 5))
    cached = m.generate(idx, 20, temperature=0.0)
    plain = torch.cat([idx, *m.stream(idx, 20, temperature=0.0, use_cache=False)], 1)
    assert torch.equal(cached, plain)
    assert config_from_dict(config_to_dict(m.config)) == m.config
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 experts"):
        small(top_k=5)
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        small(n_kv_head=3)


def test_trains_under_fp8_block_and_logs_the_load(tmp_path):
    from conftest import write_corpus
    from lowbit.train import TrainConfig, train

    corpus = write_corpus(tmp_path, "kings")
    res = train(TrainConfig(model="llama4-tiny", recipe="fp8-block", data=str(corpus), tokenizer="bytes",
                            tokens=3 * 4 * 32, batch_size=4, seq_len=32, device="cpu", log_interval=1,
                            eval_interval=100, eval_batches=1, out=str(tmp_path / "run")), progress=False)
    assert all(row["moe_load_max_over_mean"] >= 1.0 for row in res.history)
    assert res.final_val_loss == res.final_val_loss  # finite, not NaN


def test_moe_load_is_recorded_and_inspected(tmp_path):
    # a deepseek run with statistics every step: moe_load.jsonl holds per router the tokens per expert (summing to
    # tokens × top-k) and the bias, and `lowbit inspect` draws them. Bug caught: the load read after its reset
    # (all zeros), or the heatmap's rows taken from another step.
    from conftest import write_corpus
    from lowbit import precision
    from lowbit.train import TrainConfig, qstats, train

    corpus = write_corpus(tmp_path, "kings")
    out = tmp_path / "run"
    train(TrainConfig(model="deepseek-tiny", recipe="fp8-tensor", data=str(corpus), tokenizer="bytes",
                      tokens=3 * 4 * 32, batch_size=4, seq_len=32, device="cpu", log_interval=1, stats_interval=1,
                      eval_interval=100, eval_batches=1, out=str(out)), progress=False)
    recs = qstats.read(out, qstats.MOE_FILE)
    assert [r["step"] for r in recs] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # 3 MoE layers (the first is dense)
    assert all(sum(r["tokens"]) == 4 * 32 * 2 and len(r["bias"]) == 8 for r in recs)
    assert recs[-1]["max_over_mean"] == pytest.approx(max(recs[-1]["tokens"]) / (4 * 32 * 2 / 8))
    layers, share = precision.load_matrix(recs)
    assert layers == ["layers.1.ffn", "layers.2.ffn", "layers.3.ffn"]
    assert share.tolist() == [[t / 256 for t in r["tokens"]] for r in recs[-3:]]
    text = precision.inspect_run(out)
    assert "MoE load at step 3" in text and (out / "moe_load.png").is_file() and (out / "precision.png").is_file()


def test_transformers_llama4_computes_the_same_logits():
    # transformers' own Llama4ForCausalLM (an independent implementation of the same rules: NoPE every 4th layer,
    # QK-norm, top-1 sigmoid gate on the expert's input, fused expert weights) on the exported weights. Bug
    # caught: any rule of ours that differs from Meta's model as transformers implements it, or a swapped
    # gate/up half in gate_up_proj.
    pytest.importorskip("transformers")
    from lowbit.hf import from_hf, hf_config, to_hf

    torch.manual_seed(0)
    m = build_model("llama4-tiny", block_size=64, vocab_size=300).eval()
    hf = to_hf(m, eot_id=0)
    assert type(hf).__name__ == "Llama4ForCausalLM"
    x = torch.randint(0, 300, (2, 40))
    torch.testing.assert_close(hf(x).logits, m(x)[0], rtol=1e-5, atol=2e-6)  # fp32, different op order
    assert torch.equal(from_hf(hf)(x)[0], m(x)[0])
    with pytest.raises(ValueError, match="balancing bias"):
        hf_config(small(bias_update_speed=1e-3))
