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


def test_no_bf16_flag_means_upcast_without_probing(fresh):
    fresh.setattr(cpu_bf16, "cpu_flags", lambda: {"avx2", "fma"})
    fresh.setattr(cpu_bf16, "_probe_native_faster", lambda dtype: pytest.fail("probed a CPU without bf16 units"))
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == "upcast"
    assert cpu_bf16.emulated(torch.zeros(2, dtype=torch.bfloat16))


@pytest.mark.parametrize("faster,want", [(True, "native"), (False, "upcast")])
def test_flag_and_probe_decide_once(fresh, faster, want):
    calls = []
    fresh.setattr(cpu_bf16, "cpu_flags", lambda: {"avx512_bf16"})
    fresh.setattr(cpu_bf16, "_probe_native_faster", lambda dtype: calls.append(dtype) or faster)
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == want
    assert cpu_bf16.cpu_gemm_path(torch.bfloat16) == want
    assert calls == [torch.bfloat16]  # decided once per process
    assert cpu_bf16.emulated(torch.zeros(2, dtype=torch.bfloat16)) == (want == "upcast")
    assert not cpu_bf16.emulated(torch.zeros(2))  # fp32 is never emulated


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
