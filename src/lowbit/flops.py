"""Parameter, FLOPs, MFU and KV-cache accounting for lowbit's model configs.

Pure functions of a model config of any family (read through the shared attribute names n_layer, n_embd,
n_head, kv_heads, head_dim, ffn_hidden, vocab_size, block_size, mlp, tie_embeddings; the parameter count
per layer from the family's `layer_params`), plus `peak_flops(device)`.

FLOPs convention (PaLM, Chowdhery et al. 2022, App. B; Chinchilla/Kaplan likewise):
a multiply-add counts 2 FLOPs; per token, the forward pass of a GeMM with an
[in, out] weight costs 2·in·out, and attention costs 2·seq·d for the scores
(q·kᵀ over `seq` keys, d = n_head·head_dim) plus 2·seq·d for the weighted sum of
values, per layer -- the full `seq`, not the causal average seq/2, as in PaLM.
Training (forward + backward, the backward being two GeMMs per forward GeMM) is
3× the forward:
    train FLOPs/token = 6·N_matmul + 12·n_layer·seq·d
where N_matmul counts the Linear weights (output head included; embeddings are
lookups, not GeMMs). Norms, biases, softmax, activations and the optimizer are
left out (under 1% at these shapes).
"""
from __future__ import annotations

import functools
import time

import torch

from lowbit.models import FAMILIES, family_of

# Dense (no sparsity) BF16 tensor-core peak per device, FLOP/s, from vendor datasheets.
# GeForce cards: the fp32-accumulate rate (what PyTorch's bf16 matmuls use).
# Matched as a substring of torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first.
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


# Dense FP8 (E4M3/E5M2, FP32 accumulate) and FP4 tensor-core peaks, FLOP/s, from the same datasheets (NVIDIA's
# H100/H200/L40S/L4/RTX 6000 Ada product briefs, the Ada whitepaper for the RTX 4090, NVIDIA's HGX/GB200 NVL72
# specifications for Blackwell, AMD's MI300X datasheet): half the "with sparsity" figures. GPUs without FP8
# (FP4) tensor cores are absent. Matched like GPU_PEAK_BF16_FLOPS.
GPU_PEAK_FP8_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 5000e12),
    ("B200", 4500e12),
    ("H100 PCIe", 1513e12),
    ("H100 NVL", 1671e12),
    ("H200 NVL", 1671e12),
    ("H100", 1979e12),
    ("H200", 1979e12),
    ("H800", 1979e12),
    ("L40S", 733e12),
    ("L40", 362e12),
    ("L4", 242e12),
    ("RTX 6000 Ada", 728e12),
    ("RTX 4090", 330e12),
    ("MI300X", 2615e12),
)
GPU_PEAK_FP4_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 10000e12),
    ("B200", 9000e12),
)
PEAK_FORMATS = {"bf16": GPU_PEAK_BF16_FLOPS, "fp8": GPU_PEAK_FP8_FLOPS, "fp4": GPU_PEAK_FP4_FLOPS}


def count_params(config) -> dict[str, int]:
    """Analytic parameter count of the model `build_model(config)` builds.

    Returns dict(total, embedding, non_embedding): `embedding` is the token embedding
    plus (GPT) the learned position embedding; with tied weights the head *is* the token
    embedding and is counted once, inside `embedding`. An untied head is a GeMM and counts
    as non-embedding."""
    family = family_of(config)
    if family.params is not None:  # layers that differ (MoE, MLA): the family's own count, with "active"
        return family.params(config)
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    per_layer, embedding, final_norm = family.layer_params(config)
    head = 0 if config.tie_embeddings else V * d
    total = embedding + L * per_layer + final_norm + head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(config, seq_len: int | None = None) -> dict:
    """FLOPs per token (see the module docstring for the convention) at context `seq_len`
    (default: config.block_size).

    Returns a dict of floats-as-ints:
      per_layer: dict of forward FLOPs/token for one layer --
        qkv          2·d·(d + 2·kv_heads·head_dim)   (6d² without GQA)
        attn_out     2·d²
        mlp          2·2·d·ffn (GELU: 16d² at ffn=4d) or 3·2·d·ffn (SwiGLU)
        attn_scores  2·seq·d     (q·kᵀ)
        attn_values  2·seq·d     (softmax·v)
        total        their sum (24d² + 4·seq·d for a 4×-MLP MHA layer)
      layers         n_layer · per_layer total
      lm_head        2·d·V
      forward        layers + lm_head
      train          3 · forward  (= 6·matmul_params + 12·n_layer·seq·d)
      matmul_params  Linear weights (head included) -- the N of "6N"
      attention      forward attention-score FLOPs over all layers (4·n_layer·seq·d)
    """
    T = config.block_size if seq_len is None else seq_len
    if not isinstance(T, int) or T <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if family_of(config).flops is not None:  # the family's own (active experts, latent attention)
        return family_of(config).flops(config, T)
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    kv = config.kv_heads * config.head_dim
    h = config.ffn_hidden
    n_mlp_mats = 3 if config.mlp == "swiglu" else 2
    per_layer = {
        "qkv": 2 * d * (d + 2 * kv),
        "attn_out": 2 * d * d,
        "mlp": n_mlp_mats * 2 * d * h,
        "attn_scores": 2 * T * d,
        "attn_values": 2 * T * d,
    }
    per_layer["total"] = sum(per_layer.values())
    layers = L * per_layer["total"]
    lm_head = 2 * d * V
    forward = layers + lm_head
    matmul_params = L * (d * (d + 2 * kv) + d * d + n_mlp_mats * d * h) + V * d
    return {
        "seq_len": T,
        "per_layer": per_layer,
        "layers": layers,
        "lm_head": lm_head,
        "forward": forward,
        "train": 3 * forward,
        "matmul_params": matmul_params,
        "attention": L * (per_layer["attn_scores"] + per_layer["attn_values"]),
    }


def kv_cache_bytes(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token per sequence: 2 (K and V) · n_layer · kv_heads · head_dim · dtype_bytes."""
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be positive (bf16: 2, fp32: 4, fp8: 1), got {dtype_bytes}")
    kv_elems = family_of(config).kv_elems
    elems = kv_elems(config) if kv_elems is not None else 2 * config.n_layer * config.kv_heads * config.head_dim
    return elems * dtype_bytes


def kv_cache_bytes_context(config, seq_len: int | None = None, batch_size: int = 1, dtype_bytes: int = 2) -> int:
    """KV-cache bytes for batch_size sequences of seq_len tokens (default: the full context)."""
    T = config.block_size if seq_len is None else seq_len
    return kv_cache_bytes(config, dtype_bytes) * T * batch_size


def gpu_peak_flops(name: str, fmt: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a GPU (a name as torch.cuda.get_device_name gives it) for GeMMs in `fmt` ("bf16",
    "fp8", "fp4"); None if unknown or the GPU has no such tensor cores."""
    if fmt not in PEAK_FORMATS:
        raise ValueError(f"unknown GeMM format {fmt!r} for a peak; choose one of {', '.join(PEAK_FORMATS)}")
    for key, flops in PEAK_FORMATS[fmt]:
        if key.lower() in name.lower():
            return flops
    return None


def _cpu_fp8_scales(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit scales in the form lowbit.nn.hardware gives a CPU GeMM: a column and a row where this torch's CPU
    _scaled_mm takes per-row scales, else 0-d (per-tensor)."""
    from lowbit.nn.hardware import cpu_rowwise

    if cpu_rowwise():
        return torch.ones(n, 1), torch.ones(1, n)
    one = torch.ones((), dtype=torch.float32)
    return one, one


@functools.lru_cache(maxsize=None)
def measure_cpu_fp8_flops(n: int = 1024, repeats: int = 5, budget_s: float = 0.05) -> float:
    """Measured throughput of torch._scaled_mm on FP8 E4M3 operands (tensorwise scales, bf16 out) on this CPU,
    FLOP/s: the peak of gemm = "hardware" on a CPU. Best of `repeats` products at the largest size 64, 128, ...,
    n whose one product takes under `budget_s`: torch's CPU FP8 GeMM ranges from ~2.5x a bf16 matmul's time (AMD
    EPYC, AVX512-BF16) to ~0.04 GFLOP/s (a scalar path on an AMX Xeon: one 1024^3 product ~1 min), and the
    measurement must stay well under a second on either. A timing: it feeds MFU, never numerics."""
    best, size = float("inf"), 64
    while True:
        a = torch.randn(size, size).to(torch.float8_e4m3fn)
        b = torch.randn(size, size).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants it
        sa, sb = _cpu_fp8_scales(size)
        times = []
        for _ in range(repeats + 1):  # the first call is a warm-up
            t0 = time.perf_counter()
            torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            times.append(time.perf_counter() - t0)
            if times[0] > budget_s:  # too slow to repeat: this size's one product is the measurement
                break
        best = min(times[1:] or times)
        if size >= n or best * 8 > budget_s:  # the next size takes ~8x as long
            return 2 * size**3 / best
        size *= 2


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured `dtype` matmul throughput of this CPU, FLOP/s: best of `repeats` n×n×n matmuls (2n³ FLOPs each),
    after two warm-ups (the first bf16 call compiles oneDNN's kernel). Cached per (n, repeats, dtype) for the
    process: the CPU's peak does not change, and measuring costs ~0.1-1 s. A timing: it feeds MFU, never
    numerics."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_peak_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype whose matmul is the CPU's peak for GeMMs in `dtype`: bf16/fp16 where they run natively
    (lowbit.cpu_bf16), else fp32 (the upcast path multiplies in fp32)."""
    from lowbit.cpu_bf16 import cpu_gemm_path

    low = dtype in (torch.bfloat16, torch.float16)
    return dtype if low and cpu_gemm_path(dtype) == "native" else torch.float32


def peak_flops(device: str | torch.device, dtype: torch.dtype | None = None, fmt: str = "bf16") -> float:
    """Peak FLOP/s to compute MFU against on `device`, for GeMMs in `dtype` (the compute dtype), or, with
    fmt="fp8"/"fp4", for real low-precision GeMMs (gemm = "hardware").

    CUDA/ROCm: the dense tensor-core peak of the GPU for `fmt` from PEAK_FORMATS' tables;
    CPU: the measured throughput of the GeMM path taken (fp8: torch._scaled_mm; else cpu_peak_dtype: native bf16
    where the CPU has bf16 units, else fp32), so MFU compares like with like. Raises ValueError for a GPU not
    in the table or another device type (pass the peak explicitly then)."""
    device = torch.device(device)
    if device.type == "cpu":
        if fmt == "fp4":
            raise ValueError("no FP4 GeMM runs on a CPU; fp4 peaks exist for Blackwell GPUs only")
        return measure_cpu_fp8_flops() if fmt == "fp8" else measure_cpu_matmul_flops(dtype=cpu_peak_dtype(dtype))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name, fmt)
        if flops is None:
            table = {"bf16": "GPU_PEAK_BF16_FLOPS", "fp8": "GPU_PEAK_FP8_FLOPS", "fp4": "GPU_PEAK_FP4_FLOPS"}[fmt]
            raise ValueError(
                f"unknown {fmt} peak FLOP/s for GPU {name!r} (or it has no {fmt} tensor cores); add it to "
                f"lowbit.flops.{table} or pass the peak explicitly"
            )
        return flops
    raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; pass the peak explicitly")


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s × training FLOPs/token) over peak FLOP/s."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def tokens_per_s_for_mfu(target_mfu: float, flops_per_token: float, peak: float) -> float:
    """Training tokens/s that would reach `target_mfu` (a fraction, e.g. 0.4) at `peak` FLOP/s."""
    if flops_per_token <= 0:
        raise ValueError(f"flops_per_token must be positive, got {flops_per_token}")
    return target_mfu * peak / flops_per_token


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _count(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.0f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _per_layer_lines(pl: dict, d: int, mlp: str) -> list[str]:
    """The per-layer forward FLOPs table of format_report (absolute, in units of d², share of the layer)."""
    rows = [("QKV projection", pl["qkv"]), ("attention output", pl["attn_out"]), (f"MLP ({mlp})", pl["mlp"]),
            ("attention scores q.k", pl["attn_scores"]), ("attention x values", pl["attn_values"]),
            ("layer total", pl["total"])]
    lines = [f"  per layer (forward){'':16}{'FLOPs':>16}  {'x d^2':>7}  {'share':>6}"]
    for label, v in rows:
        lines.append(f"    {label:<31}{v:>16,}  {v / d**2:>7.2f}  {v / pl['total']:>6.1%}")
    return lines


def _formula_lines(config, p: dict, f: dict) -> list[str]:
    """The closed form the FLOPs follow (dense families), or the active-parameter basis (MoE/MLA families)."""
    T, L, d = f["seq_len"], config.n_layer, config.n_embd
    share = f"attention scores/values are {f['attention'] / f['forward']:.1%} of forward"
    if "active" in p:
        return [f"  = 2 per active GeMM weight ({f['matmul_params']:,}, the router included) + attention, "
                f"x 3 for training; {share}"]
    return [f"  = 6*N_matmul + 12*L*T*d = 6*{f['matmul_params']:,} + 12*{L}*{T}*{d}; {share}",
            f"  (PaLM's 6*N_non_embedding + 12*L*T*d = {6 * p['non_embedding'] + 12 * L * T * d:,}: "
            "also counts norm/bias parameters as GeMM weights)"]


def format_report(
    config,
    seq_len: int | None = None,
    mfu: float = 0.4,
    peak: float | None = None,
    name: str | None = None,
    device_name: str | None = None,
) -> str:
    """The text `lowbit flops --model NAME [--seq N]` prints: shape, parameters, FLOPs per
    token (per-layer split), KV cache, Chinchilla budget; with `peak` (FLOP/s), also the
    tokens/s and time that budget needs at utilisation `mfu` (a fraction)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be a fraction in (0, 1], got {mfu}")
    p = count_params(config)
    f = flops_per_token(config, seq_len)
    T, L, d = f["seq_len"], config.n_layer, config.n_embd
    fam = family_of(config).title
    mlp = {"gelu": "GELU 4x", "moe": "MoE, active experts"}.get(config.mlp, "SwiGLU")
    lines = [
        f"model {name or type(config).__name__} ({fam}): {L} layers, d_model {d}, "
        f"{config.n_head} heads ({config.kv_heads} kv, head dim {config.head_dim}), "
        f"MLP {mlp} {config.ffn_hidden}, context {config.block_size}, vocab {config.vocab_size:,}"
        + (", tied head" if config.tie_embeddings else ""),
        f"parameters: {p['total']:,} total = {p['non_embedding']:,} non-embedding + {p['embedding']:,} embedding"
        + (f"; {p['active']:,} active per token (the chosen experts only)" if "active" in p else ""),
        "",
        f"FLOPs per token at seq {T} (2 per multiply-add; training = 3 x forward):",
    ]
    lines += _per_layer_lines(f["per_layer"], d, mlp)
    lines += [
        f"  {L} layers{'':25}{f['layers']:>16,}",
        f"  output head{'':24}{f['lm_head']:>16,}",
        f"  forward{'':28}{f['forward']:>16,}  ({_si(f['forward'], 'FLOP')})",
        f"  training (fwd+bwd){'':17}{f['train']:>16,}  ({_si(f['train'], 'FLOP')})",
        *_formula_lines(config, p, f),
        "",
        f"KV cache (bf16): {kv_cache_bytes(config):,} bytes/token; "
        f"{kv_cache_bytes_context(config, T) / 2**20:,.2f} MiB per sequence of {T} tokens",
    ]
    if hasattr(config, "mha_kv_elems"):  # latent attention: beside what MHA of the same heads would cache
        mha = 2 * config.mha_kv_elems
        lines.append(f"  (MLA: the latent and one RoPE key per layer; MHA with the same {config.n_head} heads would "
                     f"cache {mha:,} bytes/token, {mha / kv_cache_bytes(config):.1f}x)")
    budget = 20 * p["total"]
    lines.append(
        f"Chinchilla budget (20 tokens/param): {_count(budget)} tokens = {_si(budget * f['train'], 'FLOP')} training"
    )
    if peak is not None:
        tps = tokens_per_s_for_mfu(mfu, f["train"], peak)
        where = f" on {device_name}" if device_name else ""
        lines.append(
            f"at {mfu:.0%} MFU{where} (peak {_si(peak, 'FLOP/s')}): {tps:,.0f} tokens/s; "
            f"Chinchilla budget in {_duration(budget / tps)}"
        )
    return "\n".join(lines)


def presets_table() -> str:
    """Every registered model preset: family, shape and parameter count (`lowbit flops --list`)."""
    lines = [f"{'name':<18}{'family':<9}{'layers':>7}{'d_model':>9}{'heads(kv)':>11}{'d_ff':>7}{'context':>9}"
             f"{'vocab':>8}{'params':>15}"]
    for family in FAMILIES.values():
        for name, c in family.presets.items():
            lines.append(f"{name:<18}{family.name:<9}{c.n_layer:>7}{c.n_embd:>9}{f'{c.n_head}({c.kv_heads})':>11}"
                         f"{c.ffn_hidden:>7}{c.block_size:>9}{c.vocab_size:>8}{count_params(c)['total']:>15,}")
    return "\n".join(lines)
