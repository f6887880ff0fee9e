"""lowbit.flops against hand-worked numbers, the built models, and torch's own FLOP counter."""
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lowbit import flops
from lowbit.models import PRESETS, build_model, get_config
from lowbit.models.base import KVCache


def test_gpt_per_layer_split_is_24_d_squared_plus_attention():
    c = get_config("tiny")  # d = 128, T = 128
    d, T = 128, 128
    pl = flops.flops_per_token(c)["per_layer"]
    assert (pl["qkv"], pl["attn_out"], pl["mlp"]) == (6 * d * d, 2 * d * d, 16 * d * d)
    assert pl["attn_scores"] == pl["attn_values"] == 2 * T * d
    assert pl["total"] == 24 * d * d + 4 * T * d


def test_gpt2_small_hand_worked():
    # d=768, L=12, T=1024, V=50257:
    #   per layer 24·768² = 14,155,776 + attention 4·1024·768 = 3,145,728 -> 17,301,504
    #   12 layers 207,618,048; head 2·768·50257 = 77,194,752; forward 284,812,800; training ×3 = 854,438,400
    f = flops.flops_per_token(get_config("gpt2-small"))
    assert f["per_layer"]["total"] == 17_301_504
    assert f["layers"] == 207_618_048
    assert f["lm_head"] == 77_194_752
    assert f["forward"] == 284_812_800
    assert f["train"] == 854_438_400
    # The PaLM form 6N + 12·L·T·d with N = GeMM weights (12·12·768² + 768·50257 = 123,532,032).
    assert f["matmul_params"] == 123_532_032
    assert f["train"] == 6 * 123_532_032 + 12 * 12 * 1024 * 768
    # Attention term grows with context: at T=2048 it doubles.
    f2 = flops.flops_per_token(get_config("gpt2-small"), seq_len=2048)
    assert f2["forward"] - f["forward"] == 12 * 4 * 1024 * 768


def test_gqa_and_swiglu_split():
    c = get_config("llama-tiny", n_kv_head=2)  # d=128, head_dim 32, kv dim 64, ffn 352
    pl = flops.flops_per_token(c, seq_len=64)["per_layer"]
    assert pl["qkv"] == 2 * 128 * (128 + 2 * 64)  # = 4d² instead of 6d²
    assert pl["mlp"] == 3 * 2 * 128 * 352
    assert pl["attn_scores"] == 2 * 64 * 128  # query side: n_head·head_dim = d, unchanged by GQA


@pytest.mark.parametrize("name, overrides", [("tiny", {}), ("llama-tiny", {}), ("llama-tiny", {"n_kv_head": 2})])
def test_matmul_params_equal_built_linear_weights(name, overrides):
    m = build_model(name, **overrides)
    n = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
    assert flops.flops_per_token(m.config)["matmul_params"] == n


@pytest.mark.parametrize("name, overrides", [("tiny", {}), ("tiny", {"bias": False}), ("llama-tiny", {"n_kv_head": 2})])
def test_training_flops_equal_torch_flop_counter(name, overrides):
    # Independent reference: torch.utils.flop_counter counts every mm/bmm of a real forward +
    # backward (the math SDPA backend decomposes attention into bmms over the full T×T scores,
    # i.e. the same no-causal-discount convention). Counts are exact integers.
    torch.manual_seed(0)
    m = build_model(name, **overrides)
    B, T = 2, 48
    idx = torch.randint(0, m.config.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = m(idx, idx)
        fwd = fc.get_total_flops()
        loss.backward()
    total = fc.get_total_flops()
    want = flops.flops_per_token(m.config, seq_len=T)
    assert fwd == want["forward"] * B * T
    assert total == want["train"] * B * T


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_params_keys_consistent(name):
    p = flops.count_params(PRESETS[name])
    assert p["total"] == p["embedding"] + p["non_embedding"]
    assert p["embedding"] > 0 and p["non_embedding"] > 0


def test_gpt2_small_count_params():
    p = flops.count_params(get_config("gpt2-small"))
    assert p == {"total": 163_009_536, "embedding": 50257 * 768 + 1024 * 768, "non_embedding": 123_625_728}


def test_kv_cache_bytes_hand_worked():
    # gpt2-small: 2 · 12 layers · 12 heads · 64 · 2 bytes = 36,864 B/token; 1024 tokens = 36 MiB.
    assert flops.kv_cache_bytes(get_config("gpt2-small")) == 36_864
    assert flops.kv_cache_bytes_context(get_config("gpt2-small")) == 36 * 2**20
    # llama-1.3b: 2 · 24 · 16 · 128 · 2 = 196,608 B/token; full 2048 context = 384 MiB.
    assert flops.kv_cache_bytes(get_config("llama-1.3b")) == 196_608
    assert flops.kv_cache_bytes_context(get_config("llama-1.3b")) == 384 * 2**20
    # GQA with 4 kv heads out of 16 quarters it.
    assert flops.kv_cache_bytes(get_config("llama-1.3b", n_kv_head=4)) == 196_608 // 4
    with pytest.raises(ValueError):
        flops.kv_cache_bytes(get_config("tiny"), dtype_bytes=0)


@pytest.mark.parametrize("name, overrides", [("tiny", {}), ("llama-tiny", {"n_kv_head": 2})])
def test_kv_cache_bytes_equal_the_real_cache(name, overrides):
    # The model's actual cache after a full-context prefill, in fp32 (4 bytes).
    m = build_model(name, **overrides).eval()
    caches = [KVCache(m.config.block_size) for _ in range(m.config.n_layer)]
    with torch.no_grad():
        m._hidden(torch.zeros(3, 5, dtype=torch.long), caches, 0)
    nbytes = sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert nbytes == flops.kv_cache_bytes_context(m.config, batch_size=3, dtype_bytes=4)


@pytest.mark.parametrize(
    "name, want",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("Tesla T4", None),  # no bf16 tensor cores: unknown rather than a guess
    ],
)
def test_gpu_peak_table(name, want):
    assert flops.gpu_peak_flops(name) == want


def test_peak_flops_unknown_gpu_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    with pytest.raises(ValueError, match="Mystery GPU 9000"):
        flops.peak_flops("cuda")
    with pytest.raises(ValueError, match="meta"):
        flops.peak_flops("meta")


def test_peak_flops_cpu_is_measured_and_cached():
    a = flops.peak_flops("cpu")
    # Any CPU that runs torch does more than 100 MFLOP/s and less than 100 TFLOP/s in fp32.
    assert 1e8 < a < 1e14
    assert flops.peak_flops(torch.device("cpu")) == a  # cached: the same measurement


def test_mfu_and_inverse():
    # 1000 tokens/s × 1e9 FLOPs/token = 1e12 FLOP/s out of 1e13 -> 10%.
    assert flops.mfu(1000, 1e9, 1e13) == pytest.approx(0.1)
    assert flops.tokens_per_s_for_mfu(0.1, 1e9, 1e13) == pytest.approx(1000)
    with pytest.raises(ValueError):
        flops.mfu(1000, 1e9, 0)


def test_format_report_text():
    text = flops.format_report(get_config("gpt2-small"), name="gpt2-small", mfu=0.4, peak=71e12, device_name="RTX 3090")
    for s in ("gpt2-small", "163,009,536", "854,438,400", "36,864 bytes/token", "3.26B tokens", "RTX 3090"):
        assert s in text, s
    # 0.4 · 71e12 / 854,438,400 = 33,238 tokens/s
    assert "33,238 tokens/s" in text
    short = flops.format_report(get_config("llama-tiny"), seq_len=64)
    assert "seq 64" in short and "tokens/s" not in short
    with pytest.raises(ValueError):
        flops.format_report(get_config("tiny"), mfu=1.5)


@pytest.mark.parametrize("path, want", [("native", torch.bfloat16), ("upcast", torch.float32)])
def test_cpu_peak_is_the_gemm_path_the_run_takes(monkeypatch, path, want):
    """Issue 21: bf16 on a CPU with native bf16 GeMMs measures MFU against the bf16 matmul peak (against fp32's
    it read 233%); on the upcast path, and for fp32 runs, against fp32's."""
    from lowbit import cpu_bf16

    monkeypatch.setattr(cpu_bf16, "_PATH", {torch.bfloat16: path})
    seen = []
    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda dtype=torch.float32: seen.append(dtype) or 1e9)
    assert flops.peak_flops("cpu", torch.bfloat16) == 1e9 and seen == [want]
    assert flops.peak_flops("cpu", torch.float32) == 1e9 and seen[-1] == torch.float32
    assert flops.peak_flops("cpu") == 1e9 and seen[-1] == torch.float32


@pytest.mark.parametrize(
    "name, fmt, want",  # dense = half the datasheets' "with sparsity" figures
    [
        ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),  # 3,958 TFLOPS FP8 with sparsity
        ("NVIDIA H100 PCIe", "fp8", 1513e12),
        ("NVIDIA H200", "fp8", 1979e12),
        ("NVIDIA GeForce RTX 4090", "fp8", 330e12),  # Ada whitepaper: 330.3 dense, FP32 accumulate
        ("NVIDIA L40S", "fp8", 733e12),
        ("NVIDIA B200", "fp8", 4500e12),
        ("NVIDIA B200", "fp4", 9000e12),
        ("NVIDIA GB200", "fp4", 10000e12),
        ("AMD Instinct MI300X", "fp8", 2615e12),
        ("NVIDIA A100-SXM4-80GB", "fp8", None),  # no FP8 tensor cores
        ("NVIDIA H100 80GB HBM3", "fp4", None),  # no FP4 tensor cores before Blackwell
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ],
)
def test_gpu_peak_table_per_format(name, fmt, want):
    assert flops.gpu_peak_flops(name, fmt) == want


def test_peak_flops_per_format(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="no fp8 tensor cores"):
        flops.peak_flops("cuda", fmt="fp8")
    monkeypatch.setattr(flops, "measure_cpu_fp8_flops", lambda: 7e9)
    assert flops.peak_flops("cpu", torch.bfloat16, "fp8") == 7e9  # gemm = "hardware" on a CPU: _scaled_mm's
    with pytest.raises(ValueError, match="no FP4 GeMM runs on a CPU"):
        flops.peak_flops("cpu", fmt="fp4")
    with pytest.raises(ValueError, match="unknown GeMM format"):
        flops.gpu_peak_flops("H100", "fp6")


def test_measured_cpu_fp8_peak():
    a = flops.measure_cpu_fp8_flops(n=256, repeats=2)
    assert 1e7 < a < 1e14


def test_flops_cli_gpu_peak(capsys):
    from lowbit.cli import main

    assert main(["flops", "--model", "tiny", "--gpu", "H100", "--format", "fp8"]) == 0
    assert "on H100 (fp8 GeMMs) (peak 1.98 PFLOP/s)" in capsys.readouterr().out
    assert main(["flops", "--model", "tiny", "--gpu", "A100", "--format", "fp8"]) != 0
    assert "no fp8 peak known for GPU 'A100'" in capsys.readouterr().err
    assert main(["flops", "--model", "tiny", "--gpu", "H100", "--peak", "5"]) != 0
    assert "not both" in capsys.readouterr().err


def test_cpu_fp8_peak_stops_at_its_time_budget(monkeypatch):
    # a fake clock and a _scaled_mm whose time grows as size^3 (1 ms at 64): the measurement stops at the size
    # whose next doubling would blow the 50 ms budget (bug caught: the budget check dropped -> it times 1024^3
    # products, a minute each on an AMX Xeon's scalar FP8 path)
    clock, sizes = [0.0], []

    def fake_mm(a, b, **kw):
        sizes.append(a.shape[0])
        clock[0] += 1e-3 * (a.shape[0] / 64) ** 3
        return torch.empty(0)
    monkeypatch.setattr(torch, "_scaled_mm", fake_mm)
    monkeypatch.setattr(flops.time, "perf_counter", lambda: clock[0])
    got = flops.measure_cpu_fp8_flops.__wrapped__(1024, 3, 0.05)
    assert sorted(set(sizes) - {16}) == [64, 128]  # (16: the probe for per-row scales)
    assert got == pytest.approx(2 * 128**3 / 8e-3)
