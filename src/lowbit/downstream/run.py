"""`lowbit eval --tasks`: zero-shot accuracy of a run, a comparison's runs, or a Hugging Face folder.

A run's results go to RUN_DIR/eval.json (fp32 master weights; eval-<recipe>.json through a recipe): per task the
accuracy (and normalised accuracy or perplexity) with lm-eval's standard errors, the per-item scores (what the
comparison's paired intervals need), and the settings they came from. A task already in eval.json with the same
checkpoint, recipe and limit is not run again: an interrupted comparison loses at most the run it was in.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from lowbit._io import write_json

from . import tasks as builtin

EVAL_JSON = "eval.json"
METRICS = ("acc", "acc_norm", "perplexity")
INSTALL = "pip install -e '.[eval]' (or pip install 'lm-eval>=0.4,<0.5')"
log = logging.getLogger("lowbit")


def require_lm_eval():
    """The lm_eval module, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"lowbit eval --tasks needs lm-evaluation-harness (not installed): {INSTALL}") from None
    return lm_eval


def task_manager(names: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows `names` (lowbit's built-in tasks written first), or a one-line error
    naming the unknown task. lm-eval's own task tree (slow to index) is read only when a name needs it."""
    from lm_eval.tasks import TaskManager

    from lowbit.suggest import did_you_mean

    paths = [str(builtin.task_dir(names))] if any(n in builtin.BUILTIN for n in names) else []
    paths += [include_path] if include_path else []
    tm = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if tm is None or any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        hint = did_you_mean(unknown[0], [*builtin.BUILTIN, *tm.all_tasks])
        raise ValueError(f"unknown task {unknown[0]!r}{hint}; `lowbit eval --list-tasks` lists lowbit's offline "
                         "tasks, `lm-eval ls tasks` lm-eval's")
    return tm


def load_tasks(tm, names: list[str]) -> dict:
    """lm-eval's task dict; a hub dataset that cannot be fetched is a one-line error naming the fix."""
    try:
        return tm.load(names)
    except (ConnectionError, OSError) as e:
        raise ValueError(f"could not load a task's dataset ({str(e).splitlines()[0][:160]}): without the network, "
                         "run with HF_DATASETS_OFFLINE=1 on a machine whose Hugging Face cache holds it, or point "
                         "--include-path DIR at a task YAML over local files; lowbit's own tasks work offline "
                         "(`lowbit eval --list-tasks`)") from None


def per_item(samples: list[dict], metric: str) -> list[float]:
    """Each item's score for `metric` (0/1 for accuracies), in doc_id order."""
    return [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"]) if metric in s]


def task_results(out: dict, name: str) -> dict:
    """{n, chance, <metric>, <metric>_stderr, items: {acc: [...], ...}} of one task from lm-eval's output."""
    res, samples = out["results"][name], out["samples"][name]
    row = {"n": len(samples), "chance": builtin.BUILTIN[name].chance if name in builtin.BUILTIN else None,
           "items": {}}
    for m in METRICS:
        if f"{m},none" in res:
            row[m] = float(res[f"{m},none"])
            se = res.get(f"{m}_stderr,none")
            row[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else None
            if m != "perplexity":
                row["items"][m] = per_item(samples, m)
    return row


def run_lm(lm, names: list[str], tm, limit: int | None = None) -> dict:
    """{task: task_results} of `lm` (an lm_eval LM) on `names`."""
    from lm_eval.evaluator import evaluate

    task_dict = load_tasks(tm, names)
    out = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=1000, log_samples=True,
                   verbosity="WARNING")
    return {name: task_results(out, name) for name in names}


def average(task_rows: dict) -> dict:
    """Mean accuracy over tasks (and mean normalised accuracy where each task has it)."""
    out = {}
    for m in ("acc", "acc_norm"):
        vals = [r[m] for r in task_rows.values() if m in r]
        if vals and len(vals) == len(task_rows):
            out[m] = sum(vals) / len(vals)
    return out


def eval_file(recipe: str) -> str:
    """eval.json for the fp32 master weights; eval-<recipe>.json through a recipe (one never replaces the other)."""
    return EVAL_JSON if recipe == "fp32" else "eval-" + re.sub(r"[^\w.-]", "_", recipe) + ".json"


def _step(ckpt_dir: Path) -> int | None:
    tail = ckpt_dir.name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _val_text(cfg, tok) -> str:
    """The run's validation split as text (its tokens decoded), for the held-out check."""
    from lowbit.data import prepare_dataset

    ds = prepare_dataset(cfg.data, tokenizer=tok, val_fraction=cfg.val_fraction, progress=False)
    return tok.decode([int(t) for t in ds.val])


def _check_builtin(names: list[str], cfg, tok) -> None:
    val = None
    for name in (n for n in names if n in builtin.BUILTIN):
        val = _val_text(cfg, tok) if val is None else val
        builtin.check_held_out(name, builtin.task_dir([name]), cfg.data, val)


def eval_run(run_dir, names: list[str], *, recipe: str | None = None, device="auto", limit: int | None = None,
             batch_size: int = 16, include_path: str | None = None, progress: bool = True) -> dict:
    """Evaluate a lowbit run (its newest checkpoint) on `names`; writes and returns RUN_DIR/eval.json's content.
    recipe: None = the fp32 master weights; a name = through that recipe's quantized GeMMs."""
    import json

    from lowbit.train.evaluation import load_run
    from lowbit.train.rundir import RunDir

    from .adapter import LowbitLM

    require_lm_eval()
    model, tok, cfg, rec, ckpt_dir = load_run(run_dir, device, recipe=recipe or "fp32")
    path = RunDir.of_checkpoint(ckpt_dir).path / eval_file(rec.name)
    prev = json.loads(path.read_text()) if path.is_file() else {}
    settings = {"checkpoint": ckpt_dir.name, "step": _step(ckpt_dir), "recipe": rec.name, "limit": limit}
    done = prev.get("tasks", {}) if {k: prev.get(k) for k in settings} == settings else {}
    todo = [n for n in names if n not in done]
    if todo:
        tm = task_manager(todo, include_path)
        _check_builtin(todo, cfg, tok)
        lm = LowbitLM(model, tok, rec, batch_size=batch_size, progress=progress)
        done = {**done, **run_lm(lm, todo, tm, limit)}
    result = {**settings, "tasks": done, "average": average({n: done[n] for n in names})}
    write_json(path, result)
    return result


def eval_hf(hf_dir, names: list[str], *, device="auto", limit: int | None = None, batch_size: int = 16,
            include_path: str | None = None) -> dict:
    """Evaluate a Hugging Face model folder (e.g. `lowbit export`'s output) through lm-eval's HFLM."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from lowbit.train.runtime import resolve_device

    lm = HFLM(pretrained=str(hf_dir), device=str(resolve_device(device)), batch_size=batch_size)
    tasks = run_lm(lm, names, task_manager(names, include_path), limit)
    result = {"checkpoint": str(hf_dir), "recipe": "hf", "limit": limit, "tasks": tasks,
              "average": average(tasks)}
    write_json(Path(hf_dir) / EVAL_JSON, result)
    return result


def eval_comparison(cmp_dir, names: list[str], *, recipe: str | None = None, device="auto",
                    limit: int | None = None, batch_size: int = 16, include_path: str | None = None,
                    progress: bool = True) -> dict:
    """Evaluate every finished run of a comparison directory; write its eval.json (metrics and paired
    differences to the reference) and rewrite report.md with a zero-shot section."""
    import json

    from lowbit import report
    from lowbit.comparison.runner import RESULTS_JSON
    from lowbit.train.rundir import RunDir

    from .table import comparison_summary

    cmp_dir = Path(cmp_dir)
    results = json.loads((cmp_dir / RESULTS_JSON).read_text())
    ok = {lab: r for lab, r in results["runs"].items() if r.get("status") == "ok" and RunDir(r["out"]).has_checkpoint()}
    if not ok:
        raise ValueError(f"no finished run with a checkpoint in {cmp_dir}; train it first (lowbit compare ...)")
    per_run = {}
    for i, (lab, r) in enumerate(ok.items(), 1):
        log.info("[%d/%d] %s", i, len(ok), lab)
        per_run[lab] = eval_run(r["out"], names, recipe=recipe, device=device, limit=limit, batch_size=batch_size,
                                include_path=include_path, progress=progress)
    gaps = {lab: results["runs"][lab].get("val_gap_pct") for lab in per_run}
    summary = comparison_summary(per_run, results.get("reference"), names, gaps)
    write_json(cmp_dir / eval_file(recipe or "fp32"), summary)  # report.md shows eval.json (fp32 weights)
    report.write_report(results, cmp_dir)
    return summary
