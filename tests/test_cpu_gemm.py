"""lowbit.cpu_bf16's per-process choice of the CPU bf16 GeMM path (native where the CPU has bf16 matrix units and
they are faster, fp32 upcast elsewhere), and that both paths give the fp64 product's numbers up to one bf16
rounding."""
from __future__ import annotations

import pytest
import torch

from lowbit import cpu_bf16
from lowbit.nn import QLinear


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "_PATH", {})
    monkeypatch.delenv("LOWBIT_CPU_GEMM", raising=False)
    return monkeypatch


def test_no_bf16_flag_means_upcast(fresh):
    fresh.setattr(cpu_bf16, "cpu_flags", lambda: {"avx2", "fma"})
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == "upcast"
    assert cpu_bf16.emulated(torch.zeros(2, dtype=torch.bfloat16))


@pytest.mark.parametrize("flags,want", [({"avx512_bf16"}, "native"), ({"amx_bf16", "avx2"}, "native"),
                                        ({"avx512_fp16"}, "upcast")])
def test_flags_alone_decide_once(fresh, flags, want):
    calls = []
    fresh.setattr(cpu_bf16, "cpu_flags", lambda: calls.append(1) or flags)
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == want
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == want
    assert calls == [1]  # decided once per process
    assert cpu_bf16.emulated(torch.zeros(2, dtype=torch.bfloat16)) == (want == "upcast")
    assert not cpu_bf16.emulated(torch.zeros(2))  # fp32 is never emulated


def test_no_timing_decides_the_path(fresh):
    """The path is a function of the CPU's flags: a machine where native bf16 is slow still takes it."""
    import time

    fresh.setattr(cpu_bf16, "cpu_flags", lambda: {"avx512_bf16"})
    fresh.setattr(time, "perf_counter", lambda: pytest.fail("a timing was taken to choose the GeMM path"))
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == "native"


def test_env_override(fresh):
    fresh.setenv("LOWBIT_CPU_GEMM", "native")
    fresh.setattr(cpu_bf16, "cpu_flags", lambda: set())
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == "native"
    fresh.setattr(cpu_bf16, "_PATH", {})
    fresh.setenv("LOWBIT_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="LOWBIT_CPU_GEMM"):
        cpu_bf16.cpu_gemm_path(torch.bfloat16)


@pytest.mark.parametrize("path", ["native", "upcast"])
def test_both_paths_round_the_fp64_product_once(fresh, path):
    fresh.setattr(cpu_bf16, "_PATH", {torch.bfloat16: path})
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g).bfloat16(), torch.randn(48, 256, generator=g).bfloat16()
    ref = a.double() @ b.double().t()
    y = cpu_bf16.linear(a, b)
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of an fp32-accumulated sum: within 2^-8 relative, plus fp32 summation error
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-4 * float(ref.abs().max()))
    lin = QLinear(256, 48, recipe="fp8-tensor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(a.float())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_machine_info_records_the_path():
    from lowbit.comparison import machine_info

    info = machine_info()
    assert info["cpu_bf16_gemm"] == cpu_bf16.cpu_gemm_path(torch.bfloat16)
    assert "cpu_flags" in info
    from lowbit import kernels

    assert info["quant_kernels"] == kernels.which()


def test_resume_on_another_path_is_refused_or_warned(fresh, tmp_path, private_cache, caplog):
    """A checkpoint written on one path, resumed on the other: refused with the override named; with the override
    set explicitly to the new path, it continues with a warning; on the recorded path it continues silently."""
    from conftest import write_corpus
    from lowbit.train import TrainConfig, train

    corpus = write_corpus(tmp_path, "kings")
    kw = dict(model="tiny", data=str(corpus), tokenizer="bytes", batch_size=2, seq_len=16, device="cpu",
              eval_interval=100, log_interval=1, ckpt_interval=2, out=str(tmp_path / "run"), recipe="bf16")
    fresh.setattr(cpu_bf16, "_PATH", {torch.bfloat16: "upcast"})
    train(TrainConfig(tokens=2 * 32, **kw), progress=False)
    fresh.setattr(cpu_bf16, "_PATH", {torch.bfloat16: "native"})  # e.g. the same run on an AVX512-BF16 machine
    with pytest.raises(ValueError, match="LOWBIT_CPU_GEMM=upcast to continue exactly"):
        train(TrainConfig(tokens=3 * 32, resume=True, **kw), progress=False)
    fresh.setenv("LOWBIT_CPU_GEMM", "native")
    with caplog.at_level("WARNING", logger="lowbit.train"):
        assert train(TrainConfig(tokens=3 * 32, resume=True, **kw), progress=False).steps == 3
    assert "no longer bit for bit" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowbit.train"):  # now recorded native, running native: no warning
        assert train(TrainConfig(tokens=4 * 32, resume=True, **kw), progress=False).steps == 4
    assert "bit for bit" not in caplog.text
