"""`lowbit compare`: train the same model from the same initial weights on the same batches
once per recipe (and per swept value), then write `results.json`, `loss.png` and `report.md`.

    from lowbit import compare
    from lowbit.train import TrainConfig
    res = compare(["bf16", "fp8-tensor", "fp4-direct", "fp4-paper"], TrainConfig(model="tiny", tokens=2_000_000),
                  out="runs/cmp", sweep={"dge.k": [1, 3, 5, 10]})
    res["runs"]["fp4-paper"]["val_gap_pct"]

Layout of `out/`: `results.json`, `loss.png`, `report.md`, `sweep_<param>.png`, `runs/<label>/` (one trainer
run directory each), `recipes/<label>.toml` (swept or custom recipes, passed to the trainer by path).

Resuming: calling compare again with the same arguments skips runs whose directory holds a `result.json`,
resumes a run that has a checkpoint, and retries failed ones. A different base configuration in the same
`out` raises (use overwrite=True or another out).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit import recipes as recipes_mod
from lowbit import report
from lowbit.recipes import Recipe

RESULTS_JSON = "results.json"
# TrainConfig fields that say where/how a run is stored, not what is trained: free to differ on resume.
_RUN_FIELDS = ("recipe", "out", "resume", "overwrite")
# What the trainer writes into a finished run directory.
_RESULT_FILE = "result.json"


# --- sweeps ----------------------------------------------------------------------------------

def _default_value(dc, f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return getattr(dc, f.name, None)


def sweep_keys() -> dict[str, type]:
    """The parameters a sweep may vary, with their value type: every scalar `Recipe.replace` key
    (e.g. dge.k, occ.alpha, input.rounding, scaling) plus `fmt`, which sets the element format of
    input, weight and grad_output together (the paper's E2M1/E1M2/E3M0 layout ablation)."""
    from lowbit.recipes import DGE, OCC, TensorQuant

    keys: dict[str, type] = {"fmt": str}
    nested = {"dge": DGE(), "occ": OCC(), "input": TensorQuant(), "weight": TensorQuant(),
              "grad_output": TensorQuant()}
    for head in ("dge", "occ", "input", "weight", "grad_output"):  # the paper's ablations first
        for g in dataclasses.fields(nested[head]):
            keys[f"{head}.{g.name}"] = type(getattr(nested[head], g.name))
    for f in dataclasses.fields(Recipe):
        if f.name not in nested and f.name not in ("name", "description"):
            keys[f.name] = type(_default_value(Recipe, f))
    return keys


_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a sweep value (from the CLI: a string) to the parameter's type; a clear error otherwise."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        return str(value).strip()
    except (TypeError, ValueError):
        kind = {bool: "true/false (or on/off)", int: "an integer", float: "a finite number"}.get(typ, typ.__name__)
        raise ValueError(f"sweep value {value!r} for {key!r} is not {kind}") from None


def parse_sweep(specs: list[str] | None) -> dict[str, list]:
    """CLI syntax -> sweep dict: ["dge.k=1,3,5,10", "fmt=e2m1,e1m2"] -> {"dge.k": [1.0, 3.0, ...], ...}.
    Unknown keys and malformed values raise ValueError listing what is valid."""
    out: dict[str, list] = {}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"bad --sweep {spec!r}: expected KEY=V1,V2,..., e.g. dge.k=1,3,5,10")
        if key in out:
            raise ValueError(f"--sweep {key} given twice; list all its values once: {key}=V1,V2,...")
        out[key] = [v.strip() for v in values.split(",") if v.strip()]
    return validate_sweep(out) if out else {}


def validate_sweep(sweep: dict[str, list] | None) -> dict[str, list]:
    """Check keys and coerce values to their types. Raises ValueError naming the valid keys."""
    if not sweep:
        return {}
    keys = sweep_keys()
    unknown = [k for k in sweep if k not in keys]
    if unknown:
        raise ValueError(f"unknown sweep parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; valid parameters: {', '.join(keys)}")
    out = {}
    for key, values in sweep.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"sweep[{key!r}] must be a list of values, got {values!r}")
        vals = [_coerce(key, v, keys[key]) for v in values]
        if not vals:
            raise ValueError(f"sweep[{key!r}] has no values")
        if len(set(map(repr, vals))) != len(vals):
            raise ValueError(f"sweep[{key!r}] repeats a value: {vals}")
        if key == "fmt":
            bad = [v for v in vals if v not in recipes_mod.QUANT_FORMATS]
            if bad:
                raise ValueError(f"sweep fmt value(s) {bad} unknown; choose from {', '.join(recipes_mod.QUANT_FORMATS)}")
        out[key] = vals
    return out


def _value_str(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def apply_sweep(recipe: Recipe, key: str, value) -> Recipe:
    """`recipe` with one swept parameter set, renamed `name[key=value]`."""
    label = f"{recipe.name}[{key}={_value_str(value)}]"
    if key == "fmt":
        changes = {f"{op}.fmt": value for op in ("input", "weight", "grad_output") if getattr(recipe, op) is not None}
    else:
        changes = {key: value}
    try:
        new = recipe.replace(**changes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot sweep {key}={value!r} on recipe {recipe.name!r}: {e}") from None
    desc = f"{recipe.description} [{key}={_value_str(value)}]".strip()
    return dataclasses.replace(new, name=label, description=desc)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a comparison."""

    label: str                # unique; the run directory name and the key in results["runs"]
    recipe: Recipe            # what the trainer gets (swept recipes are renamed to the label)
    base: str                 # name of the recipe it was derived from
    param: str | None = None  # swept parameter, if any
    value: Any = None


def plan_runs(recipe_list: list, sweep: dict[str, list] | None = None) -> list[RunSpec]:
    """Expand recipes x sweep into runs. Without a sweep: one run per recipe. With one: every quantized
    recipe is run once per (parameter, value), one parameter at a time (as the paper's ablations);
    unquantized recipes (bf16, fp32) have nothing to sweep and run once, as the reference."""
    if not recipe_list:
        raise ValueError("compare needs at least one recipe, e.g. ['bf16', 'fp4-paper']")
    sweep = validate_sweep(sweep)
    resolved = [recipes_mod.get(r) for r in recipe_list]
    if sweep and not any(r.quantized for r in resolved):
        raise ValueError(f"--sweep {', '.join(sweep)} varies quantization but none of the recipes "
                         f"{[r.name for r in resolved]} is quantized; add e.g. fp4-paper")
    runs = []
    for r in resolved:
        if not sweep or not r.quantized:
            runs.append(RunSpec(r.name, r, r.name))
            continue
        for key, values in sweep.items():
            for v in values:
                s = apply_sweep(r, key, v)
                runs.append(RunSpec(s.name, s, r.name, key, v))
    labels = [s.label for s in runs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"recipe(s) {dup} listed more than once; each run needs a distinct name")
    return runs


def _dirname(label: str) -> str:
    """A filesystem-safe directory name for a run label (labels may come from TOML recipe names)."""
    return re.sub(r"[^\w.\-\[\]=,+]", "_", label)


# --- machine, command ----------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU/GPU names, cores, and software versions, for the report."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version

        info["lowbit"] = version("lowbit")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    return info


def _count_arg(text: str) -> int:
    import argparse

    try:
        return importlib.import_module("lowbit.train").parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# (TrainConfig field, argparse type, help) for the options `lowbit compare` passes to every run.
_TRAIN_OPTIONS = [
    ("model", str, "model preset (tiny, gpt2-small, llama-...)"),
    ("tokens", _count_arg, "training tokens per run (2000000, 2M, 500k)"),
    ("seed", int, "seed for the initial weights and the batch order (shared by all runs)"),
    ("data", str, "text/JSONL/Parquet file or directory (default: embedded Shakespeare)"),
    ("tokenizer", str, "bpe or bytes"),
    ("vocab_size", int, "BPE vocabulary size"),
    ("batch_size", int, "sequences per micro-batch"),
    ("seq_len", int, "tokens per sequence"),
    ("grad_accum", int, "micro-batches per optimizer step"),
    ("lr", float, "peak learning rate"),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak"),
    ("warmup_steps", int, "warmup steps (default: 5%% of the steps)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("beta1", float, "AdamW beta1"),
    ("beta2", float, "AdamW beta2"),
    ("grad_clip", float, "gradient-norm clip (0 = off)"),
    ("device", str, "auto, cpu, cuda, cuda:N"),
    ("eval_interval", int, "steps between validation evaluations (default: about 10 per run, at most 100)"),
    ("eval_batches", int, "validation batches per evaluation"),
    ("log_interval", int, "steps between logged metric rows"),
    ("ckpt_interval", int, "steps between checkpoints (what an interrupted run resumes from)"),
    ("keep_last", int, "checkpoints kept per run"),
    ("max_bad_steps", int, "consecutive non-finite steps before a run counts as diverged"),
]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def command_line(recipe_list: list, base, out, sweep: dict[str, list] | None = None,
                 config_path: str | None = None) -> str:
    """The `lowbit compare` command that reproduces a comparison: recipes, model, tokens, seed, out, the sweep,
    and every train option that differs from TrainConfig's defaults. Custom Recipe objects that are neither
    registered nor files are named, with a note (their full definition is in results.json)."""
    train_mod = importlib.import_module("lowbit.train")
    default = train_mod.TrainConfig()
    names, custom = [], []
    for r in recipe_list:
        if isinstance(r, Recipe):
            names.append(r.name)
            if r.name not in recipes_mod.names() or recipes_mod.get(r.name) != r:
                custom.append(r.name)
        else:
            names.append(str(r))
    parts = ["lowbit", "compare", "--recipes", ",".join(names)]
    if config_path:
        parts += ["--config", str(config_path)]
    for field, _, _ in _TRAIN_OPTIONS:
        v = getattr(base, field, None)
        if field in ("model", "tokens", "seed") or v != getattr(default, field, None):
            if v is not None:
                parts += [_flag(field), _value_str(v) if not isinstance(v, str) else v]
    if getattr(base, "compile", False):
        parts.append("--compile")
    parts += ["--out", str(out)]
    for key, values in (sweep or {}).items():
        parts += ["--sweep", f"{key}={','.join(_value_str(v) for v in values)}"]
    cmd = " ".join(shlex.quote(p) for p in parts)
    if custom:
        cmd += f"  # custom recipe object(s) {custom}: definitions in results.json (config.recipe)"
    return cmd


# --- the comparison --------------------------------------------------------------------------------

def _json_safe(x):
    """Non-finite floats -> None (strict JSON); tuples -> lists; Paths -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _write_json(path: Path, data: dict) -> None:
    """Atomic write (temp + rename) so an interrupted comparison never leaves a torn results.json."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _config_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_FIELDS}


def _check_same_setup(prev: dict, base_cfg: dict, out: Path) -> None:
    old = prev.get("base_config") or {}
    diff = sorted(k for k in set(old) | set(base_cfg) if old.get(k) != base_cfg.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {base_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"{out} holds a comparison with a different configuration ({shown}); "
                         "pass overwrite=True (--overwrite) to start over, or use another out directory")


def _record(spec: RunSpec, cfg, status: str, result: dict | None = None, error: str | None = None) -> dict:
    """One entry of results["runs"]."""
    r = result or {}
    keys = ("final_train_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "step_time_s",
            "peak_mem_bytes", "quant_stats", "wall_time_s", "diverged_at_step", "init_hash", "data_hash")
    rec = {"label": spec.label, "recipe": spec.base,
           "sweep": None if spec.param is None else {"param": spec.param, "value": spec.value},
           "status": status, "error": error}
    rec.update({k: r.get(k) for k in keys})
    rec.update({"val_gap_abs": None, "val_gap_pct": None, "step_time_rel": None,
                "config": {"train": dataclasses.asdict(cfg), "recipe": spec.recipe.to_dict()},
                "history": r.get("history") or [], "out": str(cfg.out)})
    return rec


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux: VmHWM via /proc/self/clear_refs), so the
    peak memory of each CPU run is its own rather than the largest of all runs so far in this process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    """VmHWM of this process in bytes (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_MEM_NOTES = {
    "cuda": "peak CUDA memory allocated during the run",
    "rss": "peak resident set size of the process during the run (CPU; Linux VmHWM, reset before each run)",
    "trainer": "as reported by the trainer (on CPU: the process's peak RSS so far, which only grows across runs)",
}


def _model_info(base, vocab_size: int) -> dict:
    """Model name, parameter counts and tokens per parameter, for the report's title and results.json."""
    from lowbit.flops import count_params
    from lowbit.models import get_config

    n = count_params(get_config(base.model, vocab_size=vocab_size))
    return {"name": base.model, "vocab_size": vocab_size, "params": n["total"],
            "non_embedding_params": n["non_embedding"], "tokens_per_param": base.tokens / n["total"]}


def _recipe_key(recipe: Recipe) -> str:
    """What a recipe computes, without its name/description: equal keys train identically."""
    d = recipe.to_dict()
    d.pop("name", None)
    d.pop("description", None)
    return json.dumps(d, sort_keys=True)


def _has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "ckpt"
    return ckpt.is_dir() and any(p.is_dir() and p.name.startswith("step_") for p in ckpt.iterdir())


def _check_hashes(runs: dict[str, dict]) -> None:
    """Every run must start from the same initial weights and see the same first batch as the first one."""
    first = next((r for r in runs.values() if r.get("init_hash") and r.get("data_hash")), None)
    if first is None:
        return
    for r in runs.values():
        for key, what in (("init_hash", "initial weights"), ("data_hash", "first training batch")):
            if r.get(key) and r[key] != first[key]:
                raise RuntimeError(
                    f"run {r['label']!r} has different {what} than {first['label']!r} ({key} {r[key][:12]}... vs "
                    f"{first[key][:12]}...): the comparison is not like for like. Same seed and model must give the "
                    "same start; if the runs come from an earlier comparison with other settings, rerun with "
                    "--overwrite")


def _summarize(results: dict) -> dict:
    """Pick the reference, fill gaps, list failed runs. In place."""
    runs = results["runs"]
    ref, note = report.pick_reference(list(runs))
    results["reference"], results["reference_note"] = ref, note
    report.add_gaps(runs, ref)
    results["failed"] = [lab for lab, r in runs.items() if str(r["status"]).startswith("failed")]
    results["diverged"] = [lab for lab, r in runs.items() if r["status"] == "diverged"]
    sources = sorted({r.get("peak_mem_source") for r in runs.values() if r.get("peak_mem_source")})
    results["peak_mem_note"] = "; ".join(_MEM_NOTES[s] for s in sources) or None
    return results


def compare(recipes: list, base=None, out: str | Path = "runs/compare", sweep: dict[str, list] | None = None,
            progress: bool = True, *, overwrite: bool | None = None, command: str | None = None) -> dict:
    """Train `base` once per recipe (x sweep value) from identical weights and batches; write the report.

    recipes:   names, `.toml` paths or Recipe objects, e.g. ["bf16", "fp8-tensor", "fp4-paper"].
    base:      TrainConfig shared by every run (its recipe/out/resume/overwrite are set per run);
               None = TrainConfig().
    out:       comparison directory (see module docstring for its layout).
    sweep:     {param: [values]}, e.g. {"dge.k": [1, 3, 5, 10]}; see `sweep_keys()`. One parameter varied at a
               time on every quantized recipe; labels like "fp4-paper[dge.k=3]".
    overwrite: discard an earlier comparison in `out` (default: base.overwrite); otherwise resume it.
    command:   the command line to record in the report (default: the equivalent `lowbit compare` command).
    Returns the content of results.json. Raises RuntimeError if runs did not share initial weights/batches.
    A run that diverges is recorded with status "diverged"; one that raises, "failed: <error>"; the others run.
    """
    train_mod = importlib.import_module("lowbit.train")
    base = train_mod.TrainConfig() if base is None else base
    sweep = validate_sweep(sweep)
    specs = plan_runs(list(recipes), sweep)
    out = Path(out)
    device = train_mod.resolve_device(base.device)  # fails early (e.g. cuda asked, none present), not per run
    overwrite = bool(base.overwrite) if overwrite is None else overwrite
    base_cfg = _config_dict(base)

    results_path = out / RESULTS_JSON
    if overwrite:
        for name in ("runs", "recipes"):
            shutil.rmtree(out / name, ignore_errors=True)
        for p in [results_path, out / report.LOSS_PNG, out / report.REPORT_MD, *out.glob("sweep_*.png")]:
            p.unlink(missing_ok=True)
    prev_runs = {}
    if not overwrite and results_path.is_file():
        prev = json.loads(results_path.read_text())
        _check_same_setup(prev, _json_safe(base_cfg), out)
        prev_runs = prev.get("runs") or {}
    out.mkdir(parents=True, exist_ok=True)

    results = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or command_line(list(recipes), base, out, sweep),
        "machine": {**machine_info(), "device": str(device)},
        "base_config": base_cfg,
        "model": None,
        "recipes": list(dict.fromkeys(s.base for s in specs)),
        "sweep": sweep or None,
        "reference": None, "reference_note": None,
        "runs": {},
    }
    cfgs = {}
    for spec in specs:
        run_dir = out / "runs" / _dirname(spec.label)
        recipe_arg: str = spec.recipe.name
        if spec.recipe.name not in recipes_mod.names() or recipes_mod.get(spec.recipe.name) != spec.recipe:
            # swept or custom recipe: hand it to the trainer as a TOML file (TrainConfig.recipe is a name or path)
            path = out / "recipes" / f"{_dirname(spec.label)}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            recipes_mod.save(spec.recipe, path)
            recipe_arg = str(path)
        old = (prev_runs.get(spec.label) or {}).get("config", {}).get("recipe")
        if old is not None and old != _json_safe(spec.recipe.to_dict()) and run_dir.exists():
            raise ValueError(f"recipe {spec.label!r} differs from the one its run in {run_dir} was trained with; "
                             "pass overwrite=True (--overwrite) to start over, or use another out directory")
        cfgs[spec.label] = dataclasses.replace(base, recipe=recipe_arg, out=str(run_dir), resume=False,
                                               overwrite=False)
        results["runs"][spec.label] = _record(spec, cfgs[spec.label], "pending")
    _write_json(results_path, _summarize(results))

    on_cpu = device.type == "cpu"
    data_mod = importlib.import_module("lowbit.data")
    dataset = None  # prepared lazily: all runs may already be finished

    trained: dict[str, str] = {}  # effective recipe -> label of the run that trained it
    bar = None
    if progress:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=len(specs), desc="compare", unit="run", position=0, leave=True, disable=not tty)
    try:
        for i, spec in enumerate(specs, 1):
            cfg, run_dir = cfgs[spec.label], Path(cfgs[spec.label].out)
            if bar is not None:
                bar.set_description(f"recipe {i}/{len(specs)}: {spec.label}")
                if not tty:  # logs get one line per run instead of a bar
                    print(f"[compare] recipe {i}/{len(specs)}: {spec.label}", file=sys.stderr, flush=True)
            key = _recipe_key(spec.recipe)
            done = run_dir / _RESULT_FILE
            if key in trained:
                # same effective recipe as an earlier run (e.g. fp4-paper[dge.k=5] and fp4-paper[occ.alpha=0.99]
                # are both plain fp4-paper): same weights, batches and numerics, so the same result; not retrained
                rec = copy.deepcopy(results["runs"][trained[key]])
                rec.update(label=spec.label, sweep=_record(spec, cfg, "")["sweep"], same_run_as=trained[key],
                           reused=True)
                rec["config"] = {**rec["config"], "recipe": spec.recipe.to_dict()}
            elif done.is_file():
                result = json.loads(done.read_text())
                prev_rec = prev_runs.get(spec.label) or {}
                mem_source = "cuda" if not on_cpu else "trainer"
                if prev_rec.get("peak_mem_source") == "rss" and prev_rec.get("peak_mem_bytes") is not None:
                    result["peak_mem_bytes"], mem_source = prev_rec["peak_mem_bytes"], "rss"  # measured then
                rec = _record(spec, cfg, "diverged" if result.get("diverged_at_step") is not None else "ok", result)
                rec["peak_mem_source"] = mem_source
                rec["reused"] = True
            else:
                if dataset is None:
                    # once for all runs (what train() would do per run from the same config fields)
                    dataset = data_mod.prepare_dataset(base.data, tokenizer=base.tokenizer,
                                                       vocab_size=base.vocab_size, val_fraction=base.val_fraction)
                if _has_checkpoint(run_dir):
                    cfg = dataclasses.replace(cfg, resume=True)
                elif run_dir.exists():  # interrupted before its first checkpoint: start it again
                    cfg = dataclasses.replace(cfg, overwrite=True)
                try:
                    rss = on_cpu and _reset_peak_rss()
                    result = train_mod.train(cfg, progress=progress, dataset=dataset)
                    result = result.to_dict() if hasattr(result, "to_dict") else dict(result)
                    mem_source = "cuda" if not on_cpu else "trainer"
                    peak = _peak_rss() if rss else None
                    if peak is not None:
                        result["peak_mem_bytes"], mem_source = peak, "rss"
                    diverged = result.get("diverged_at_step") is not None
                    rec = _record(spec, cfg, "diverged" if diverged else "ok", result)
                    rec["peak_mem_source"] = mem_source
                except Exception as e:  # one broken run must not cost the others; KeyboardInterrupt still stops
                    msg = f"{type(e).__name__}: {e}".strip()
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "error.txt").write_text(traceback.format_exc())
                    rec = _record(spec, cfg, f"failed: {msg}", error=msg)
                rec["reused"] = False
            results["runs"][spec.label] = rec
            if rec["status"] in ("ok", "diverged") and key not in trained:
                trained[key] = spec.label
            if results.get("model") is None:
                if dataset is not None:
                    results["model"] = _model_info(base, dataset.tokenizer.vocab_size)
                elif (run_dir / "tokenizer").is_dir():
                    vocab = data_mod.Tokenizer.load(run_dir / "tokenizer").vocab_size
                    results["model"] = _model_info(base, vocab)
            _summarize(results)
            _write_json(results_path, results)
            report.write_report(results, out)
            _check_hashes(results["runs"])
            if bar is not None:
                bar.update(1)
                bar.write(f"[compare] {_one_line(rec)}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    return json.loads(json.dumps(_json_safe(results)))


def _one_line(rec: dict) -> str:
    loss, gap = rec.get("final_val_loss"), rec.get("val_gap_pct")
    s = f"{rec['label']}: {rec['status']}"
    if isinstance(loss, float) and math.isfinite(loss):
        s += f", val loss {loss:.4f}"
    if isinstance(gap, float) and math.isfinite(gap):
        s += f" ({gap:+.2f}% vs reference)"
    if rec.get("tokens_per_s"):
        s += f", {rec['tokens_per_s']:,.0f} tokens/s"
    return s + (" [reused]" if rec.get("reused") else "")


# --- CLI --------------------------------------------------------------------------------------------

DEFAULT_RECIPES = "bf16,fp8-tensor,fp4-direct,fp4-paper"


def add_cli(subparsers):
    """Register `lowbit compare` on an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "compare", help="train one model per recipe from identical weights and batches; write a report",
        description="Train the same model from the same initial weights on the same batches once per recipe "
                    "(and per swept value), then write results.json, loss.png and report.md into --out. "
                    "Re-running the same command resumes an interrupted comparison.")
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated recipe names or .toml paths, or 'all' (default: {DEFAULT_RECIPES}; "
                        f"known: {', '.join(recipes_mod.names())})")
    p.add_argument("--out", default="runs/compare", help="comparison directory (default: runs/compare)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="ablation: vary one recipe parameter over values on every quantized recipe, e.g. "
                        "dge.k=1,3,5,10, occ.alpha=0.999,0.99,0.97, occ.compensate=true,false, fmt=e2m1,e1m2,e3m0; "
                        "repeatable (one parameter at a time)")
    p.add_argument("--config", help="TrainConfig TOML file used as the base; other options override it")
    for field, typ, help_ in _TRAIN_OPTIONS:
        p.add_argument(_flag(field), dest=field, type=typ, default=None, help=help_)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each model")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier comparison in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)
    return p


def default_eval_interval(cfg) -> int:
    """About ten validation points per run, so loss.png has curves to compare (a comparison is about the
    curves; `lowbit train`'s fixed default of 100 steps gives a short run only one or two points)."""
    steps = cfg.tokens // (cfg.batch_size * cfg.seq_len * cfg.grad_accum)
    return max(1, min(cfg.eval_interval, steps // 10))


def _config_sets(path: str | None, key: str) -> bool:
    if not path:
        return False
    import tomllib

    try:
        with open(path, "rb") as f:
            return key in tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # TrainConfig.from_toml already reported a bad file


def run_cli(args) -> int:
    """Run `lowbit compare` from parsed args. Returns the exit status: 0, or 1 if any run failed."""
    train_mod = importlib.import_module("lowbit.train")
    base = train_mod.TrainConfig.from_toml(args.config) if args.config else train_mod.TrainConfig()
    overrides = {f: getattr(args, f) for f, _, _ in _TRAIN_OPTIONS if getattr(args, f, None) is not None}
    if args.compile:
        overrides["compile"] = True
    base = dataclasses.replace(base, **overrides)
    if "eval_interval" not in overrides and not _config_sets(args.config, "eval_interval"):
        base = dataclasses.replace(base, eval_interval=default_eval_interval(base))
    names = recipes_mod.names() if args.recipes.strip() == "all" else [
        r.strip() for r in args.recipes.split(",") if r.strip()]
    sweep = parse_sweep(args.sweep)
    command = command_line(names, base, args.out, sweep, config_path=args.config)
    results = compare(names, base, args.out, sweep=sweep, progress=not args.no_progress,
                      overwrite=args.overwrite, command=command)
    out = Path(args.out)
    print(f"wrote {out / RESULTS_JSON}, {out / report.LOSS_PNG}, {out / report.REPORT_MD}")
    print(report.format_table(results))
    if results["failed"]:
        print(f"error: {len(results['failed'])} run(s) failed: {', '.join(results['failed'])} "
              f"(tracebacks in {out}/runs/<label>/error.txt)", file=sys.stderr)
        return 1
    return 0
