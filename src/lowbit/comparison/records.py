"""Run records and summaries of a comparison: what results.json holds about each run and across runs.

Pure functions of dicts (no training, no files): one record per run (`record`), the reference and the gaps
to it (`summarize`, which returns new dicts and never changes the records it reads), the like-for-like
checks (`check_hashes`, `check_same_setup`), the machine and model descriptions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
from pathlib import Path

from lowbit.comparison.isoloss import iso_loss
from lowbit.comparison.sweep import RunSpec
from lowbit.recipes import Recipe

REFERENCE_RECIPE = "bf16"
_RESULT_KEYS = ("final_train_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "step_time_s",
                "peak_mem_bytes", "quant_stats", "wall_time_s", "diverged_at_step", "init_hash", "data_hash")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    from lowbit.cpu_bf16 import cpu_flags, cpu_gemm_path

    flags = cpu_flags()
    info["cpu_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16") if f in flags)
    info["cpu_bf16_gemm"] = cpu_gemm_path(torch.bfloat16)
    from lowbit import kernels

    info["quant_kernels"] = kernels.which()  # fused CPU kernels or eager PyTorch ops (same numbers)
    try:
        from importlib.metadata import version

        info["lowbit"] = version("lowbit")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    return info


def record(spec: RunSpec, cfg, status: str, result: dict | None = None, error: str | None = None) -> dict:
    """One entry of results["runs"]: the run's label, recipe, sweep value and status, the trainer's result
    (a TrainResult dict, or None for a run without one), its configuration and history. The gap columns
    are filled by `summarize`."""
    r = result or {}
    rec = {"label": spec.label, "recipe": spec.base,
           "sweep": None if spec.param is None else {"param": spec.param, "value": spec.value},
           "status": status, "error": error}
    rec.update({k: r.get(k) for k in _RESULT_KEYS})
    if result is not None:  # measured by the trainer itself (older result.json files lack the source)
        rec["peak_mem_source"] = r.get("peak_mem_source") or "trainer"
    rec.update({"val_gap_abs": None, "val_gap_pct": None, "step_time_rel": None,
                "config": {"train": dataclasses.asdict(cfg), "recipe": spec.recipe.to_dict()},
                "history": r.get("history") or [], "out": str(cfg.out)})
    return rec


def check_same_setup(prev: dict, base_cfg: dict, out: Path) -> None:
    old = prev.get("base_config") or {}
    diff = sorted(k for k in set(old) | set(base_cfg) if old.get(k) != base_cfg.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {base_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"{out} holds a comparison with a different configuration ({shown}); "
                         "pass --overwrite (overwrite=True in Python) to start over, or use another --out")


def model_info(base, vocab_size: int) -> dict:
    """Model name, parameter counts and tokens per parameter, for the report's title and results.json."""
    from lowbit.flops import count_params
    from lowbit.models import get_config

    n = count_params(get_config(base.model, vocab_size=vocab_size))
    return {"name": base.model, "vocab_size": vocab_size, "params": n["total"],
            "non_embedding_params": n["non_embedding"], "tokens_per_param": base.tokens / n["total"]}


def recipe_key(recipe: Recipe) -> str:
    """What a recipe computes, without its name/description: equal keys train identically."""
    d = recipe.to_dict()
    d.pop("name", None)
    d.pop("description", None)
    return json.dumps(d, sort_keys=True)


def check_hashes(runs: dict[str, dict]) -> None:
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


MEM_NOTES = {
    "cuda": "peak CUDA memory allocated during the run",
    "rss": "peak resident set size of the process during the run (CPU; Linux VmHWM, reset before each run)",
    "trainer": "the process's peak RSS so far (no per-run reset on this platform: it only grows across runs)",
}


def pick_reference(labels: list[str]) -> tuple[str | None, str | None]:
    """(reference label, note). `bf16` when present, else the first label, with a note
    saying so (the report must not silently compare against something else)."""
    if not labels:
        return None, None
    if REFERENCE_RECIPE in labels:
        return REFERENCE_RECIPE, None
    return labels[0], (f"`{REFERENCE_RECIPE}` is not among the compared recipes; gaps and relative "
                       f"step times are measured against the first recipe, `{labels[0]}`.")


def gaps(runs: dict[str, dict], reference: str | None) -> dict[str, dict]:
    """{label: {"val_gap_abs", "val_gap_pct", "step_time_rel"}}: validation loss minus the reference's,
    the same in % of the reference's loss, step time over the reference's. None wherever either side is
    missing or non-finite (failed or diverged runs). Reads `runs`, changes nothing."""
    ref = runs.get(reference) if reference is not None else None
    ref_ok = bool(ref) and ref.get("status") == "ok"
    ref_loss = ref.get("final_val_loss") if ref_ok else None
    ref_step = ref.get("step_time_s") if ref_ok else None
    out = {}
    for label, r in runs.items():
        loss, step, ok = r.get("final_val_loss"), r.get("step_time_s"), r.get("status") == "ok"
        g = {"val_gap_abs": None, "val_gap_pct": None, "step_time_rel": None}
        if ok and finite(loss) and finite(ref_loss):
            g["val_gap_abs"] = loss - ref_loss
            g["val_gap_pct"] = 100.0 * (loss - ref_loss) / ref_loss if ref_loss != 0 else None
        if ok and finite(step) and finite(ref_step) and ref_step > 0:
            g["step_time_rel"] = step / ref_step
        out[label] = g
    return out


def _timed_ratios(runs: dict, timing: dict | None) -> None:
    """With a timing phase, each run's step_time_rel, step_ms / cpu_ms and timed_tokens_per_s are the timing
    phase's, in place (a reused label takes the run it is the same as); training's own step_time_s and
    tokens_per_s stay as measured (throughput under whatever else the machine did then)."""
    if not timing:
        return
    per = timing.get("per_recipe") or {}
    for label, r in runs.items():
        t = per.get(r.get("same_run_as") or label)
        if t is not None:
            r["step_time_rel"] = t.get("rel")
            r["step_ms"], r["cpu_ms"] = 1e3 * t["step_s"], 1e3 * t["cpu_s"]
            if finite(r.get("tokens")) and r.get("steps") and t["step_s"] > 0:
                r["timed_tokens_per_s"] = r["tokens"] / r["steps"] / t["step_s"]


def summarize(results: dict) -> dict:
    """A copy of `results` with the reference picked, every run's gaps filled and the failed / diverged
    runs and the peak-memory note listed."""
    results = copy.deepcopy(results)
    runs = results["runs"]
    ref, note = pick_reference(list(runs))
    results["reference"], results["reference_note"] = ref, note
    for label, g in gaps(runs, ref).items():
        runs[label].update(g)
    _timed_ratios(runs, results.get("timing"))
    for label, g in iso_loss(runs, ref).items():  # after the timed ratios: the matched cost uses them
        runs[label].update(g)
    results["failed"] = [lab for lab, r in runs.items() if str(r["status"]).startswith("failed")]
    results["diverged"] = [lab for lab, r in runs.items() if r["status"] == "diverged"]
    sources = sorted({r.get("peak_mem_source") for r in runs.values() if r.get("peak_mem_source")})
    results["peak_mem_note"] = "; ".join(MEM_NOTES[s] for s in sources if s in MEM_NOTES) or None
    return results


def one_line(rec: dict) -> str:
    loss, gap = rec.get("final_val_loss"), rec.get("val_gap_pct")
    s = f"{rec['label']}: {rec['status']}"
    if isinstance(loss, float) and math.isfinite(loss):
        s += f", val loss {loss:.4f}"
    if isinstance(gap, float) and math.isfinite(gap):
        s += f" ({gap:+.2f}% vs reference)"
    if rec.get("tokens_per_s"):
        s += f", {rec['tokens_per_s']:,.0f} tokens/s"
    return s + (" [reused]" if rec.get("reused") else "")


def eta_seconds(finished: list[tuple[bool, float]], remaining: list[bool]) -> float | None:
    """Seconds the remaining runs will take, from what the finished ones cost: `finished` holds (quantized,
    wall seconds) of each finished run, reused ones with the wall time they recorded (so the estimate after a
    resume is what it was before the interruption); `remaining` the quantized flag of each run still to go.
    Each remaining run costs the mean of the finished runs of its kind (quantized recipes simulate their GeMMs
    and cost more), or of all finished runs when none of its kind has finished. None before any run finished."""
    walls = [w for _, w in finished if finite(w)]
    if not walls:
        return None if remaining else 0.0
    mean = sum(walls) / len(walls)
    by_kind = {}
    for q, w in finished:
        if finite(w):
            by_kind.setdefault(q, []).append(w)
    return sum(sum(by_kind[q]) / len(by_kind[q]) if q in by_kind else mean for q in remaining)
