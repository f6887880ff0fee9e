"""`lowbit export`: a trained checkpoint -> a Hugging Face directory, full precision or with packed FP4/FP8 weights.

    export("runs/x", "hf-out")                          # config.json + model.safetensors (fp32) + tokenizer
    export("runs/x", "hf-fp4", weights_format="fp4")    # config + tokenizer + model.fp4.safetensors (packed)
    model, tok = load_packed("hf-fp4")                  # dequantized lowbit model (hf=True: a transformers model)

The exported weights are the run's high-precision master weights (what the optimizer updated); a model trained
under an FP4/FP8 recipe computes with them in plain fp32 after export (its quantized GeMMs are a training-time
simulation), unless `lowbit.convert(hf_model, recipe)` is applied again.

Packed layout (`model.fp4.safetensors` / `model.fp8.safetensors`, lowbit's own module names and [out, in]
layouts): every transformer-block GeMM weight `W` as `W.codes` (uint8: E2M1 codes two per byte, or E4M3 bit
patterns) and `W.scales` (fp32, one per output channel: the vector-wise absmax scaling of the FP4 paper), so
`W ≈ dequantize(codes) · scales`; embeddings, norms, biases and the output head (kept high precision in
training too) in bf16. The safetensors metadata `lowbit_packed` (JSON) records the format and shapes.
`config.json` and the tokenizer are the same as a full-precision export, but transformers cannot read the
packed file itself: load it with `load_packed`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from lowbit._io import publish_modes, temp_dir
from lowbit import hf as hf_mod
from lowbit.models import build_model, config_from_dict, config_to_dict
from lowbit.quant import QTensor, dequantize, quantize
from lowbit.tensor_quant import TensorQuant

WEIGHTS_FORMATS = ("fp32", "bf16", "fp4", "fp8")
PACKED_QUANT = {"fp4": TensorQuant(fmt="e2m1", granularity="row"), "fp8": TensorQuant(fmt="e4m3", granularity="row")}
_PACKED_FILE = "model.{fmt}.safetensors"
_META_KEY = "lowbit_packed"


def _packable(name: str, t: torch.Tensor, model) -> bool:
    """The GeMM weights lowbit quantizes in training: 2-D `.weight`s of Linear layers in the blocks."""
    from lowbit.nn import QLinear

    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QLinear))}
    return t.dim() == 2 and name in linears and not name.startswith("lm_head")


def _check_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export directory {out} exists and is not empty; choose another --out or delete it")
    return out


@contextlib.contextmanager
def _staged(out: Path):
    """A temporary directory beside `out`, renamed to `out` when the block succeeds and removed when it fails:
    a failed export leaves no directory (an empty `out` that already existed is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        yield tmp
        publish_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bf16_bytes(sd: dict[str, torch.Tensor]) -> int:
    seen, n = set(), 0
    for t in sd.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * 2
    return n


def save_packed(model, tok, out: str | os.PathLike, weights_format: str) -> Path:
    """Write config.json, the tokenizer and packed weights (see module docstring) into directory `out`."""
    from safetensors.torch import save_file

    if weights_format not in PACKED_QUANT:
        raise ValueError(f"packed weights_format must be one of {sorted(PACKED_QUANT)}, got {weights_format!r}")
    q = PACKED_QUANT[weights_format]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_mod.hf_config(model.config, tok.eot_id).save_pretrained(out)
    hf_mod.hf_tokenizer(tok).save_pretrained(out)
    tok.save_meta(out)
    tensors, shapes = {}, {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        ptr = t.data_ptr()
        if ptr in seen:  # tied head: stored once (model.state_dict() lists it twice)
            continue
        seen[ptr] = name
        if _packable(name, t, model):
            qt = quantize(t, q)
            tensors[f"{name}.codes"] = qt.codes.contiguous()
            tensors[f"{name}.scales"] = qt.scales.contiguous()
            shapes[name] = list(t.shape)
        else:
            tensors[name] = t.to(torch.bfloat16).contiguous()
    info = {"format": weights_format, "fmt": q.fmt, "granularity": q.granularity, "packed": shapes,
            "model_config": config_to_dict(model.config)}
    save_file(tensors, str(out / _PACKED_FILE.format(fmt=weights_format)), metadata={_META_KEY: json.dumps(info)})
    return out


def load_packed_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state_dict of the lowbit model with every packed weight dequantized, the packing info) from a
    directory written by save_packed (or the .safetensors file itself)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("model.fp*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{p} has no packed weights (model.fp4.safetensors / model.fp8.safetensors); "
                                    "write them with `lowbit export --weights-format fp4|fp8`")
        p = files[0]
    with safe_open(str(p), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get(_META_KEY, "null") or "null")
        if info is None:
            raise ValueError(f"{p} is not a lowbit packed-weights file (no {_META_KEY!r} metadata)")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    q = PACKED_QUANT[info["format"]]
    sd = {}
    for name, shape in info["packed"].items():
        qt = QTensor(raw.pop(f"{name}.codes"), raw.pop(f"{name}.scales"), torch.Size(shape), q, torch.float32)
        sd[name] = dequantize(qt)
    sd.update({k: v.float() for k, v in raw.items()})
    return sd, info


def load_packed(path: str | os.PathLike, hf: bool = False):
    """(model, tokenizer) from a packed export: a lowbit model (fp32), or with hf=True a transformers model
    and PreTrainedTokenizerFast, with the dequantized weights."""
    sd, info = load_packed_state_dict(path)
    model = build_model(config_from_dict(info["model_config"]))
    hf_mod.load_exact(model, sd)
    d = Path(path) if Path(path).is_dir() else Path(path).parent
    tok = hf_mod.tokenizer_from_dir(d)
    if hf:
        return hf_mod.to_hf(model, tok.eot_id), hf_mod.hf_tokenizer(tok)
    return model.eval(), tok


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


def export(ckpt: str | os.PathLike, out: str | os.PathLike, to: str = "hf", weights_format: str = "fp32") -> dict:
    """Export a run (its newest valid checkpoint) or a checkpoint directory; returns a summary dict with
    `out`, `architecture`, `weights_format`, `weights_bytes` (on disk) and `bf16_bytes` (the same weights
    in bf16, for comparison)."""
    from lowbit.train.evaluation import load_checkpoint

    if to != "hf":
        raise ValueError(f"unknown export target {to!r}; supported: hf")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights format {weights_format!r}; choose one of {', '.join(WEIGHTS_FORMATS)}")
    out = _check_out(out)
    hf_mod.require_transformers()  # before anything is read or written
    model, tok, _ = load_checkpoint(ckpt, device="cpu")
    with _staged(out) as tmp:
        if weights_format in PACKED_QUANT:
            save_packed(model, tok, tmp, weights_format)
            arch = hf_mod.architecture(model.config) + " config, packed"
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_format]
            hf_mod.save_pretrained(model, tok, tmp, dtype=dtype)
            arch = hf_mod.architecture(model.config)
    return {"out": str(out), "architecture": arch, "weights_format": weights_format,
            "weights_bytes": dir_bytes(out), "bf16_bytes": _bf16_bytes(model.state_dict())}
