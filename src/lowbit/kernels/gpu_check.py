"""The Triton kernels' first-use check on a GPU (lowbit.kernels._gpu_self_check calls it): the fused kernels and
the elementwise pass against the eager quantizer on a small tensor with NaN, inf, zeros and ties, bit for bit,
and the FP8 codes the hardware path takes from them, decoded."""
from __future__ import annotations

import torch

from lowbit.formats import get_format
from lowbit.tensor_quant import TensorQuant

_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def compare_on(device: torch.device, reference, run_triton, eager_only) -> str | None:
    """Why the Triton kernels differ from the eager quantizer on `device`, or None. reference:
    lowbit.quant.fake_quantize_with_scales; run_triton and eager_only: lowbit.kernels' (passed in, so this module
    imports neither: no cycle)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 64, generator=g) * torch.logspace(-3, 3, 64)).to(device)
    x[2] = 0.0
    special = x.clone()  # a NaN and an inf: the whole tensor (or that row) must come out NaN
    special[1, :3] = torch.tensor([float("nan"), float("inf"), 0.0])
    fused = (TensorQuant("e4m3", "tensor"), TensorQuant("e2m1", "row"), TensorQuant("e2m1", "tile", 32, "e8m0"),
             TensorQuant("e5m2", "row", reciprocal=True), TensorQuant("e2m1", "tile", 16, "e4m3"),
             TensorQuant("e4m3", "row", scale_fmt="e8m0", scale_round="ceil"))
    scaled = (TensorQuant("e4m3", "block", 16), TensorQuant("e2m1", "row", scale_mult=0.75))
    for q in fused + scaled:
        for t in (x, x.bfloat16(), special):
            sat = not (q.scale_fmt == "fp32" and not q.reciprocal)
            if q in fused:
                got = run_triton(t, q, get_format(q.fmt), None, sat)
            else:
                got = reference(t, q)  # through lowbit.quant: eager scales, the Triton elementwise pass
            with eager_only():
                ref = reference(t, q)
            if not all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(got, ref)):
                return f"they differ from the eager quantizer ({q.fmt} {q.granularity}, {t.dtype})"
            if q in fused and q.fmt in _FP8:  # the FP8 codes quantize() takes from the kernel, decoded
                codes, sc = run_triton(t, q, get_format(q.fmt), None, sat, dequant=False, codes=True)
                deq = (codes.view(_FP8[q.fmt]).float() * (sc if q.granularity == "tensor" else sc.view(-1, 1)))
                if not torch.equal(deq.to(t.dtype).nan_to_num(7.0), ref[0].nan_to_num(7.0)):
                    return f"their FP8 codes differ from the eager quantizer's ({q.fmt} {q.granularity}, {t.dtype})"
    return None
