"""hypothesis fuzzing of the config loader and the quantizers: random TOML documents, random shapes, dtypes and
values (NaN/inf included). The contract under test is "works, or raises one of the documented errors":

- TrainConfig.from_toml: ValueError (invalid TOML, unknown key, wrong type, out-of-range value, unknown
  model/recipe/device), FileNotFoundError (a recipe .toml path that does not exist), nothing else; a document that
  loads round-trips through to_toml.
- fake_quantize / quantize / dequantize: ValueError exactly when a tile/block does not divide the tensor (the
  documented shape rule), TypeError for input that is not fp32/bf16/fp16; otherwise same shape and dtype, codes+scales reproduce
  fake_quantize bit for bit, NaN poisons exactly its group, finite groups stay finite.

tests/test_quant.py already checks the numerics (error bound, symmetry, monotonicity, idempotence) on well-formed
shapes; this file adds the malformed and non-finite corners."""
from __future__ import annotations

import datetime as dt
import math
import string

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lowbit.quant import dequantize, fake_quantize, quantize
from lowbit.tensor_quant import GRANULARITIES, QUANT_FORMATS, TensorQuant
from lowbit.train.config import TrainConfig, field_names, field_types

# --- a small TOML writer (tomllib only reads) ------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in v) + '"'
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_key(k: str) -> str:
    return k if k and all(c in string.ascii_letters + string.digits + "_-" for c in k) else toml_value(k)


scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12), st.dates(),
    # values that look right for some field, so documents often get past the type checks
    st.sampled_from(["tiny", "small", "fp32", "bf16", "fp4-paper", "nvfp4", "bpe", "bytes", "cpu", "auto", "cuda:0",
                     "2M", "500k", "1.5B", "-1k", "1e3", "runs/x", "x.toml", "", "tpu", 0, 1, 16, 128, -1, 0.5, 1e-3,
                     1.0, 0.0, -0.0]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
keys = st.one_of(st.sampled_from(field_names()), st.text(min_size=1, max_size=10))


@st.composite
def toml_documents(draw) -> str:
    if draw(st.integers(0, 9)) == 0:  # sometimes not TOML at all
        return draw(st.text(max_size=40))
    doc = draw(st.dictionaries(keys, values, max_size=6))
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=toml_documents())
def test_config_loader_works_or_raises_documented_errors(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text, encoding="utf-8")
    try:
        cfg = TrainConfig.from_toml(p)
    except ValueError as e:
        assert str(e)  # a message, not a bare exception
        return
    except FileNotFoundError as e:
        assert "recipe file" in str(e)  # only a recipe .toml path that does not exist
        return
    # it loaded: every field has its declared type and the document round-trips
    for name, typ in field_types().items():
        v = getattr(cfg, name)
        assert v is None or isinstance(v, typ) and not (typ is int and isinstance(v, bool)), (name, v)
    q = tmp_path / "back.toml"
    q.write_text(cfg.to_toml())
    assert TrainConfig.from_toml(q) == cfg


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(field_names()), value=values)
@example(name="weight_decay", value=2 ** 53 + 1)  # an int a float field widens inexactly (hypothesis found it)
def test_every_field_with_any_value(tmp_path, name, value):
    """One key at a time, so each field's own checks get exercised (not just the first failing one)."""
    p = tmp_path / "one.toml"
    p.write_text(f"{name} = {toml_value(value)}\n", encoding="utf-8")
    try:
        cfg = TrainConfig.from_toml(p)
    except ValueError as e:
        assert name in str(e) or "recipe" in str(e) or "model" in str(e) or "device" in str(e), str(e)
        return
    except FileNotFoundError as e:
        assert name == "recipe" and "recipe file" in str(e)
        return
    typ = field_types()[name]
    got = getattr(cfg, name)
    assert isinstance(got, typ)
    if typ in (float, str, bool):  # taken as written; an int for a float field is widened (float(2**53 + 1) is
        # 2**53: the widening rounds, so compare with the widened value); accepted floats are never NaN
        want = float(value) if typ is float and isinstance(value, int) and not isinstance(value, bool) else value
        assert got == want


# --- quantizers ----------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8]
FINITE_LIM = {torch.float32: 2.0**100, torch.bfloat16: 2.0**100, torch.float16: 8192.0}
# fp16 stays below 8192: an upward-rounded power-of-two / E4M3 scale can push an output a little above the absmax,
# which near fp16's max would overflow to inf (see tests/test_quant.py::arrays).


@st.composite
def quant_cases(draw):
    fmt = draw(st.sampled_from(QUANT_FORMATS))
    gran = draw(st.sampled_from(GRANULARITIES))
    block = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32])) if gran in ("tile", "block") else 0
    scale_fmt = draw(st.sampled_from(["fp32", "e8m0", "e4m3"]))
    rounding = draw(st.sampled_from(["nearest", "stochastic"]))
    conventions = dict(scale_round=draw(st.sampled_from(["floor", "ceil"])), reciprocal=draw(st.booleans()),
                       four_over_six=draw(st.booleans()), scale_rule=draw(st.sampled_from(["absmax", "quest"])),
                       scale_mult=draw(st.sampled_from([1.0, 4 / 3, 0.75])))
    try:
        q = TensorQuant(fmt, gran, block, scale_fmt, rounding=rounding, **conventions)
    except ValueError:  # an invalid combination is refused by the recipe itself (tested in test_recipes)
        assume(False)
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    n = math.prod(shape)
    special = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, 6.0, -0.25])
    lim = FINITE_LIM.get(dtype, 100)
    vals = draw(st.lists(st.one_of(st.floats(-lim, lim, width=32), special), min_size=n, max_size=n))
    return q, shape, dtype, vals


def expected_error(q: TensorQuant, shape: tuple, dtype: torch.dtype):
    """The documented failures: input other than float32/bfloat16/float16 (TypeError); a tile/block not dividing the last dim, or a block
    not dividing the (flattened) rows (ValueError)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return TypeError
    if q.granularity in ("tile", "block"):
        C = shape[-1] if shape else 1
        R = math.prod(shape[:-1]) if shape else 1
        if C % q.block or (q.granularity == "block" and R % q.block):
            return ValueError
    return None


def groups(t: torch.Tensor, q: TensorQuant) -> torch.Tensor:
    """[n_groups, group_size] view of t per the scaling granularity (one scale per row)."""
    if q.granularity == "tensor":
        return t.reshape(1, -1)
    C = t.shape[-1] if t.dim() else 1
    if q.granularity == "row":
        return t.reshape(-1, C)
    b = q.block
    if q.granularity == "tile":
        return t.reshape(-1, b)
    R = t.numel() // C
    return t.reshape(R // b, b, C // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)


@settings(max_examples=300, deadline=None)
@given(case=quant_cases())
def test_quantizers_work_or_raise_documented_errors(case):
    q, shape, dtype, vals = case
    if dtype.is_floating_point:
        x = torch.tensor(vals, dtype=torch.float32).to(dtype).reshape(shape)
    else:
        x = torch.tensor([0 if not math.isfinite(v) else int(max(min(v, 100), 0)) for v in vals],
                         dtype=dtype).reshape(shape)
    err = expected_error(q, shape, dtype)
    gen = torch.Generator().manual_seed(0)
    if err is not None:
        with pytest.raises(err):
            fake_quantize(x, q, generator=gen)
        return
    y = fake_quantize(x, q, generator=gen)
    assert y.shape == x.shape and y.dtype == x.dtype
    d = dequantize(quantize(x, q, generator=torch.Generator().manual_seed(0)))
    assert d.shape == x.shape and d.dtype == x.dtype
    torch.testing.assert_close(d, y, rtol=0, atol=0, equal_nan=True)  # codes + scales reproduce it exactly
    if x.numel() == 0:
        return
    xg, yg = groups(x.float(), q), groups(y.float(), q)
    has_nan = torch.isnan(xg).any(1)
    assert torch.isnan(yg[has_nan]).all()  # a NaN poisons its whole group, never silently becomes a number
    finite = torch.isfinite(xg).all(1)
    if q.scale_fmt == "e4m3" and q.granularity != "tensor":
        # NVFP4's two-level scale: the fp32 tensor scale comes from the whole tensor's absmax, so a non-finite
        # value anywhere reaches every group through it
        finite &= bool(torch.isfinite(x).all())
    assert torch.isfinite(yg[finite]).all()  # finite groups stay finite
    zeros = (xg == 0) & finite[:, None]
    assert (yg[zeros] == 0).all()  # zeros stay zero


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_toml_strings_round_trip(value):
    """Regression (hypothesis found out = "\\x1f"): control characters and DEL are escaped, so a config or recipe
    with any string reads back as written."""
    import tomllib

    from lowbit._io import toml_value

    assert tomllib.loads(f"k = {toml_value(value)}")["k"] == value
