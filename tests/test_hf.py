"""Hugging Face integration: lowbit.convert on transformers GPT-2 (Conv1D) and Llama models, training them with
the HF Trainer and with a lowbit-style loop, export to a directory transformers loads offline with the same
logits, --init-from, and packed FP4/FP8 weight export. Tiny configs (<= 2 layers, width 64), no network."""
from __future__ import annotations

import os
import random
import sys

import pytest

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra is not installed: "
                                                          "pip install 'lowbit[hf]'")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lowbit  # noqa: E402
from lowbit import hf as hf_mod  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.data import Batcher, Tokenizer, train_bpe  # noqa: E402
from lowbit.export import PACKED_QUANT, export, load_packed, load_packed_state_dict  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.nn import QConv1D, QLinear  # noqa: E402
from lowbit.quant import fake_quantize  # noqa: E402
from lowbit.train import TrainConfig, load_checkpoint, train  # noqa: E402
from lowbit.train.runtime import state_dict_hash  # noqa: E402

# Logit tolerance, lowbit vs transformers, both fp32: the same weights and the same math in a different
# operation order (SDPA kernels, addmm vs linear, RoPE as rotate_half vs pair rotation). Each fp32 op is
# exact to ~6e-8 relative; two layers of such differences on logits of size ~1 stay below 1e-5.
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def hf_gpt2(**kw):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg)


def hf_llama():
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def perturb_vectors(model: nn.Module) -> nn.Module:
    """Random biases / norm gains, so a wrong mapping of them cannot hide behind zeros and ones."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def ids(B=2, T=24, V=256, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- convert on transformers models ------------------------------------------------------------------------

def test_convert_gpt2_conv1d_keeps_state_dict_and_head():
    model = hf_gpt2()
    before = {k: (tuple(v.shape), v.clone()) for k, v in model.state_dict().items()}
    lowbit.convert(model, "fp4-paper")
    blk = model.transformer.h[0]
    for m in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
        assert type(m) is QConv1D
    assert type(model.lm_head) is nn.Linear  # the head stays high precision
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(tuple(after[k].shape) == before[k][0] and torch.equal(after[k], before[k][1]) for k in after)
    # the converted model still loads into a plain transformers model
    plain = hf_gpt2()
    plain.load_state_dict(after)


def test_qconv1d_equals_qlinear_on_the_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # nf=48 out, nx=64 in: weight [64, 48]
    nn.init.normal_(conv.bias)
    qc = QConv1D.from_conv1d(conv, "fp4-paper")
    ql = QLinear(64, 48, recipe="fp4-paper")
    with torch.no_grad():
        ql.weight.copy_(conv.weight.t())
        ql.bias.copy_(conv.bias)
    x = torch.randn(3, 10, 64) * torch.linspace(0.2, 4, 64)
    xc, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, yl = qc(xc), ql(xl)
    dy = torch.randn_like(yc)
    yc.backward(dy)
    yl.backward(dy)
    # the same GeMMs on the same (transposed-view) operands: bit for bit
    assert torch.equal(yc, yl) and torch.equal(xc.grad, xl.grad)
    assert torch.equal(conv.weight.grad, ql.weight.grad.t()) and torch.equal(conv.bias.grad, ql.bias.grad)
    assert qc.weight is conv.weight and qc.weight.shape == (64, 48)
    # an fp32 recipe reproduces Conv1D itself (x·W + b as one addmm vs F.linear: fp32 reassociation only)
    q32 = QConv1D.from_conv1d(conv, "fp32")
    torch.testing.assert_close(q32(x), conv(x), rtol=1e-6, atol=1e-6)


def test_convert_llama_projections():
    model = lowbit.convert(hf_llama(), "fp8-tensor")
    names = {n for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(names) == 2 * 7 and all(("self_attn" in n) or ("mlp" in n) for n in names)
    assert type(model.lm_head) is nn.Linear


def _lm_texts(n=64, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(["the cat", "a dog", "sees", "runs", "far"]) for _ in range(8)) for _ in range(n)]


def test_hf_trainer_trains_a_converted_gpt2(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lowbit.convert(hf_gpt2(), "fp4-paper")
    start = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (32, 16), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, max_steps=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                             disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=data).train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, start)  # the QConv1D weights trained
    # and the trained, converted model saves and reloads as a plain transformers model
    model.save_pretrained(tmp_path / "saved")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_lowbit_loop_trains_a_converted_llama():
    # lowbit's training pieces (Batcher, the recipe's autocast, clipping, AdamW) on a converted HF model
    from lowbit.recipes import get
    from lowbit.train.runtime import autocast, make_optimizer

    model = hf_mod.CausalLMAdapter(lowbit.convert(hf_llama(), "fp4-paper"))
    recipe, dev = get("fp4-paper"), torch.device("cpu")
    tokens = torch.tensor([i % 7 for i in range(4000)], dtype=torch.int64).numpy()  # a periodic sequence
    batcher = Batcher(tokens, 8, 32, seed=0, device=dev)
    opt = make_optimizer(model, TrainConfig(lr=3e-3), dev)
    losses = []
    for _ in range(12):
        x, y = batcher.next()
        with autocast(recipe, dev):
            _, loss = model(x, y.contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # from ln(256) = 5.5 to well under it: a period-7 sequence is quickly learnable
    assert losses[0] > 5.0 and min(losses[-3:]) < 4.0


# --- export: lowbit -> transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [
    ("tiny", dict(n_layer=2, n_embd=64, n_head=2)),                       # bias=True, qkv_bias=False, untied
    ("tiny", dict(n_layer=2, n_embd=64, n_head=2, bias=False, tie_embeddings=True)),
    ("llama-tiny", dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2)),    # GQA, interleaved RoPE
])
def test_to_hf_same_logits_and_round_trip(name, kw):
    torch.manual_seed(0)
    model = perturb_vectors(build_model(name, vocab_size=256, block_size=64, **kw)).eval()
    hf = hf_mod.to_hf(model)
    x = ids()
    want = model(x)[0]
    got = hf(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert want.abs().max() > 0.1  # not comparing near-zeros
    back = hf_mod.from_hf(hf)
    assert back.config == model.config
    assert state_dict_hash(back) == state_dict_hash(model)  # exact round trip


def test_rope_permutation_is_needed():
    # Without the q/k permutation the HF model would compute different logits: the mapping is not vacuous.
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=256, n_layer=1, n_embd=64, n_head=2, block_size=64).eval()
    sd = hf_mod.to_hf_state_dict(model.state_dict(), model.config)
    hf = hf_mod.to_hf(model)
    sd["model.layers.0.self_attn.q_proj.weight"] = model.layers[0].attention.wq.weight
    sd["model.layers.0.self_attn.k_proj.weight"] = model.layers[0].attention.wk.weight
    hf.load_state_dict(sd)
    assert (hf(input_ids=ids()).logits - model(ids())[0]).abs().max() > 1e-3


def test_lowbit_config_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="activation_function='gelu_new'"):
        hf_mod.from_hf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=256, n_positions=64)))
    # a plain HF GPT-2 with exact GELU maps (bias everywhere)
    m = perturb_vectors(hf_gpt2(activation_function="gelu")).eval()
    lb = hf_mod.from_hf(m).eval()
    torch.testing.assert_close(lb(ids())[0], m(input_ids=ids()).logits, rtol=RTOL, atol=ATOL)


def test_tokenizer_wrappers_give_lowbit_ids():
    text = "The quick brown fox, jumps over the lazy dog! Ünïcødé 123"
    bpe = train_bpe(_lm_texts() + [text], vocab_size=300)
    for tok in (bpe, Tokenizer("bytes")):
        fast = hf_mod.hf_tokenizer(tok)
        assert fast(text)["input_ids"] == tok.encode(text)
        assert fast.decode(tok.encode(text)) == text
        assert fast.eos_token_id == tok.eot_id
    assert hf_mod.hf_tokenizer(Tokenizer("bytes"))("ab")["input_ids"] == [97, 98]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained GPT run with a BPE tokenizer (a few seconds)."""
    d = tmp_path_factory.mktemp("run")
    os.environ.setdefault("LOWBIT_CACHE", str(d / "cache"))
    corpus = d / "c.txt"
    corpus.write_text("\n".join(_lm_texts(600)))
    cfg = TrainConfig(model="tiny", recipe="fp32", data=str(corpus), tokenizer="bpe", vocab_size=300,
                      tokens=4 * 8 * 32, batch_size=8, seq_len=32, device="cpu", eval_batches=1, log_interval=2,
                      out=str(d / "run"))
    train(cfg, progress=False)
    return d / "run"


def test_cli_export_loads_offline_with_same_logits(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run_dir), "--to", "hf", "--out", str(out)]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    model, tok, _ = load_checkpoint(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    hft = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the cat sees a dog"
    assert hft(text)["input_ids"] == tok.encode(text)
    x = torch.tensor([tok.encode(text * 3)[:32]])
    torch.testing.assert_close(hf(input_ids=x).logits, model(x)[0], rtol=RTOL, atol=ATOL)
    # a second export into the same (now non-empty) directory is refused with a clear error
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out)]) == 2
    assert "lowbit: error: export directory" in capsys.readouterr().err


def test_train_init_from_an_exported_directory(run_dir, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out)]) == 0
    exported, _ = hf_mod.load_pretrained(out)
    corpus = tmp_path / "more.txt"
    corpus.write_text("\n".join(_lm_texts(300, seed=1)))
    res = train(TrainConfig(init_from=str(out), data=str(corpus), tokens=2 * 8 * 32, batch_size=8, seq_len=32,
                            device="cpu", eval_batches=1, out=str(tmp_path / "cont"), model="tiny"), progress=False)
    assert res.init_hash == state_dict_hash(exported)  # started from the exported weights, not a fresh init
    assert Tokenizer.load(tmp_path / "cont" / "tokenizer").encode("the cat") == \
        hf_mod.tokenizer_from_dir(out).encode("the cat")
    # the continued run's weights moved and it exports again
    model, _, _ = load_checkpoint(tmp_path / "cont")
    assert state_dict_hash(model) != res.init_hash


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_packed_export_dequantizes_and_is_small(run_dir, tmp_path, fmt, capsys):
    out = tmp_path / fmt
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out), "--weights-format", fmt]) == 0
    report = capsys.readouterr().out
    assert "MB of weights on disk, 0." in report and "they take in bf16" in report  # smaller than bf16
    model, _, _ = load_checkpoint(run_dir)
    sd, info = load_packed_state_dict(out)
    q = PACKED_QUANT[fmt]
    ref = model.state_dict()
    packed = set(info["packed"])
    assert packed == {k for k in ref if k.startswith("transformer.h.") and k.endswith("weight") and ref[k].dim() == 2}
    for k, v in ref.items():
        if k in packed:  # exactly the per-channel fake-quantized weight
            assert torch.equal(sd[k], fake_quantize(v.float(), q)), k
        else:  # the rest in bf16
            assert torch.equal(sd[k], v.to(torch.bfloat16).float()), k
    # size: 4-bit codes + one fp32 scale per row vs 16 bits per weight, on the block matrices
    packed_bytes = (out / f"model.{fmt}.safetensors").stat().st_size
    bf16_bytes = sum(v.numel() * 2 for v in ref.values())
    assert packed_bytes < bf16_bytes
    lb, _ = load_packed(out)
    hf, fast = load_packed(out, hf=True)
    x = ids(V=model.config.vocab_size)
    torch.testing.assert_close(hf(input_ids=x).logits, lb(x)[0], rtol=RTOL, atol=ATOL)


def test_export_without_transformers_creates_nothing(run_dir, tmp_path, monkeypatch, capsys):
    """Issue 21: the missing extra is named and no (empty) output directory is left behind."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    out = tmp_path / "exports" / "hf"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out)]) == 2
    assert "pip install 'lowbit[hf]'" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


def test_export_files_keep_the_umask_mode(run_dir, tmp_path):
    """Issue 21: the exported model.safetensors was 0600 (safetensors' own mode)."""
    import stat

    old = os.umask(0o022)
    try:
        export(run_dir, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "hf").iterdir()} == \
        {p.name: oct(0o644) for p in (tmp_path / "hf").iterdir()}


def test_failed_export_leaves_no_directory(run_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ValueError("disk full")

    monkeypatch.setattr(hf_mod, "save_pretrained", boom)
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match="disk full"):
        export(run_dir, out)
    assert list(tmp_path.iterdir()) == []  # neither `out` nor the staging directory
