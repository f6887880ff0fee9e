"""`compare(recipes, base, out)`: train the same model from the same initial weights on the same batches once
per recipe (and per swept value), then write `results.json`, `loss.png` and `report.md`.

Layout of `out/`: `results.json`, `loss.png`, `report.md`, `sweep_<param>.png`, `runs/<label>/` (one
trainer run directory each), `recipes/<label>.toml` (swept or custom recipes, passed to the trainer by path).

Resuming: calling compare again with the same arguments reuses runs whose directory holds a `result.json`,
resumes a run that has a checkpoint, and retries failed ones. A different base configuration in the same
`out` raises (use --overwrite / overwrite=True, or another out).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import shutil
import sys
import traceback
from pathlib import Path

from lowbit import recipes
from lowbit import report
from lowbit._io import json_safe, write_json
from lowbit.comparison import records
from lowbit.comparison.command import command_line
from lowbit.comparison.sweep import RunSpec, dirname, plan_runs, validate_sweep

log = logging.getLogger("lowbit")
RESULTS_JSON = "results.json"
SAMPLE_PROMPT = "ROMEO:"
SAMPLE_TOKENS = 48
# sampled as `lowbit generate`'s defaults sample (greedy decoding of a small model loops on "the a a a ...")
SAMPLE_TEMPERATURE, SAMPLE_TOP_K, SAMPLE_SEED = 0.8, 50, 0


def compare(recipes: list, base=None, out: str | Path = "runs/compare", sweep: dict[str, list] | None = None,
            progress: bool = True, *, overwrite: bool | None = None, command: str | None = None,
            train_fn=None, timing_rounds: int = 3) -> dict:
    """Train `base` once per recipe (x sweep value) from identical weights and batches; write the report.

    recipes:   names, `.toml` paths or Recipe objects, e.g. ["bf16", "fp8-tensor", "fp4-paper"].
    base:      TrainConfig shared by every run (its recipe/out/resume/overwrite are set per run); None = default.
    out:       comparison directory (see the module docstring for its layout).
    sweep:     {param: [values]}, e.g. {"dge.k": [1, 3, 5, 10]}; see `sweep_keys()`. One parameter varied at a
               time on every quantized recipe; labels like "fp4-paper[dge.k=3]".
    overwrite: discard an earlier comparison in `out` (default: base.overwrite); otherwise resume it.
    command:   the command line to record in the report (default: the equivalent `lowbit compare` command).
    train_fn:  the trainer, train(cfg, progress=, dataset=) -> TrainResult (default: lowbit.train.train).
    timing_rounds: rounds of the timing phase after training (lowbit.comparison.timing; 0 = none: the step-time
               ratios are then those of training, under whatever load the machine had).
    Returns the content of results.json. Raises RuntimeError if runs did not share initial weights/batches.
    A run that diverges is recorded with status "diverged"; one that raises, "failed: <error>"; the others run.
    """
    from lowbit.train import TrainConfig, resolve_device, train

    base = TrainConfig() if base is None else base
    specs = plan_runs(list(recipes), validate_sweep(sweep))
    out, device = Path(out), resolve_device(base.device)  # fails early (e.g. cuda asked, none present)
    prev_runs = _prepare_out(out, base, bool(base.overwrite) if overwrite is None else overwrite)
    results = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": command or command_line(list(recipes), base, out, validate_sweep(sweep)),
               "machine": {**records.machine_info(), "device": str(device)}, "base_config": base.shared_dict(),
               "model": None, "recipes": list(dict.fromkeys(s.base for s in specs)),
               "sweep": validate_sweep(sweep) or None, "reference": None, "reference_note": None, "runs": {}}
    cfgs = {s.label: _run_config(s, base, out, prev_runs) for s in specs}
    results["runs"] = {s.label: records.record(s, cfgs[s.label], "pending") for s in specs}
    write_json(out / RESULTS_JSON, records.summarize(results))
    runner = _Runner(base, train_fn or train, progress)
    with _Progress(progress, len(specs)) as bar:
        for i, spec in enumerate(specs, 1):
            bar.start(i, spec.label)
            rec = runner.run(spec, cfgs[spec.label], results["runs"])
            results["runs"][spec.label] = rec
            results["model"] = results["model"] or runner.model_info(Path(cfgs[spec.label].out))
            summary = records.summarize(results)
            write_json(out / RESULTS_JSON, summary)
            report.write_report(summary, out)
            records.check_hashes(summary["runs"])
            to_train = [s.recipe.quantized for s in specs[i:] if not runner.will_reuse(s, cfgs[s.label])]
            bar.done(records.one_line(summary["runs"][spec.label]), spec.recipe.quantized, rec.get("wall_time_s"),
                     to_train)
    return _finish(results, runner, cfgs, device, out, timing_rounds)


def _finish(results: dict, runner, cfgs: dict, device, out: Path, timing_rounds: int) -> dict:
    """After training: the timing phase, the samples, and the final results.json and report."""
    from lowbit.comparison import timing

    summary = records.summarize(results)
    timed = [lab for lab, r in summary["runs"].items() if r["status"] == "ok" and not r.get("same_run_as")]
    if timing_rounds and timed:
        results["timing"] = timing.measure({lab: cfgs[lab] for lab in timed}, runner.ensure_dataset(),
                                           summary["reference"], device, rounds=timing_rounds)
        for w in results["timing"]["warnings"]:
            log.warning("%s", w)
    results["samples"] = samples(summary, device)
    summary = records.summarize(results)
    write_json(out / RESULTS_JSON, summary)
    report.write_report(summary, out)
    return json.loads(json.dumps(json_safe(summary)))


def _prepare_out(out: Path, base, overwrite: bool) -> dict:
    """Clear an old comparison (overwrite) or read its runs (resume, same base configuration only)."""
    results_path = out / RESULTS_JSON
    if overwrite:
        for name in ("runs", "recipes"):
            shutil.rmtree(out / name, ignore_errors=True)
        for p in [results_path, out / report.LOSS_PNG, out / report.REPORT_MD, out / "iso_loss.png", out / "eval.json",
                  *out.glob("sweep_*.png"), *out.glob("precision_*.png")]:
            p.unlink(missing_ok=True)
    prev_runs = {}
    if not overwrite and results_path.is_file():
        prev = json.loads(results_path.read_text())
        records.check_same_setup(prev, json_safe(base.shared_dict()), out)
        prev_runs = prev.get("runs") or {}
    out.mkdir(parents=True, exist_ok=True)
    return prev_runs


def _run_config(spec: RunSpec, base, out: Path, prev_runs: dict):
    """The TrainConfig of one run: the base with this run's recipe (a TOML file for swept/custom recipes) and
    directory; refuses a recipe that differs from the one an existing run directory was trained with."""
    run_dir = out / "runs" / dirname(spec.label)
    recipe_arg: str = spec.recipe.name
    if spec.recipe.name not in recipes.names() or recipes.get(spec.recipe.name) != spec.recipe:
        path = out / "recipes" / f"{dirname(spec.label)}.toml"  # TrainConfig.recipe is a name or a path
        path.parent.mkdir(parents=True, exist_ok=True)
        recipes.save(spec.recipe, path)
        recipe_arg = str(path)
    old = (prev_runs.get(spec.label) or {}).get("config", {}).get("recipe")
    if old is not None and run_dir.exists() and _as_recipe(old) != spec.recipe:
        raise ValueError(f"recipe {spec.label!r} differs from the one its run in {run_dir} was trained with; "
                         "pass --overwrite (overwrite=True in Python) to start over, or use another --out")
    return dataclasses.replace(base, recipe=recipe_arg, out=str(run_dir), resume=False, overwrite=False)


def _as_recipe(d: dict):
    """A recorded recipe dict as a Recipe (fields added since it was written take their defaults), or None."""
    try:
        return recipes.Recipe.from_dict(d)
    except (TypeError, ValueError):
        return None


class _Runner:
    """Runs (or reuses) one RunSpec at a time; prepares the dataset once, lazily, for all runs."""

    def __init__(self, base, train_fn, progress: bool):
        self.base, self.train_fn, self.progress = base, train_fn, progress
        self.dataset = None
        self.trained: dict[str, str] = {}  # effective recipe -> label of the run that trained it

    def will_reuse(self, spec: RunSpec, cfg) -> bool:
        """True when run() will not train `spec` (a finished run directory, or an effective recipe trained
        already): the time-left estimate counts only what will train."""
        from lowbit.train.rundir import RunDir

        return records.recipe_key(spec.recipe) in self.trained or RunDir(cfg.out).read_result() is not None

    def run(self, spec: RunSpec, cfg, runs: dict) -> dict:
        from lowbit.train.rundir import RunDir

        key, run = records.recipe_key(spec.recipe), RunDir(cfg.out)
        if key in self.trained:
            # same effective recipe as an earlier run (e.g. fp4-paper[dge.k=5] and fp4-paper[occ.alpha=0.99] are
            # both plain fp4-paper): same weights, batches and numerics, so the same result; not retrained
            rec = copy.deepcopy(runs[self.trained[key]])
            rec.update(label=spec.label, sweep=records.record(spec, cfg, "")["sweep"], same_run_as=self.trained[key],
                       reused=True, config={**rec["config"], "recipe": spec.recipe.to_dict()})
            return rec
        result = run.read_result()
        rec = self._train(spec, cfg, run) if result is None else {**_status_record(spec, cfg, result), "reused": True}
        if rec["status"] in ("ok", "diverged"):
            self.trained[key] = spec.label
        return rec

    def ensure_dataset(self):
        """The dataset every run shares, prepared once, lazily (what train() would do per run from the same
        config fields)."""
        if self.dataset is None:
            from lowbit.data import prepare_dataset

            b = self.base
            self.dataset = prepare_dataset(b.data, tokenizer=b.tokenizer, vocab_size=b.vocab_size,
                                           val_fraction=b.val_fraction)
        return self.dataset

    def _train(self, spec: RunSpec, cfg, run) -> dict:
        self.ensure_dataset()
        if run.has_checkpoint():
            cfg = dataclasses.replace(cfg, resume=True)
        elif run.path.exists():  # interrupted before its first checkpoint: start it again
            cfg = dataclasses.replace(cfg, overwrite=True)
        try:
            result = self.train_fn(cfg, progress=self.progress, dataset=self.dataset).to_dict()
            rec = _status_record(spec, cfg, result)
        except Exception as e:  # one broken run must not cost the others; KeyboardInterrupt still stops
            msg = f"{type(e).__name__}: {e}".strip()
            run.path.mkdir(parents=True, exist_ok=True)
            (run.path / "error.txt").write_text(traceback.format_exc())
            rec = records.record(spec, cfg, f"failed: {msg}", error=msg)
        return {**rec, "reused": False}

    def model_info(self, run_dir: Path) -> dict | None:
        if self.dataset is not None:
            return records.model_info(self.base, self.dataset.tokenizer.vocab_size)
        if (run_dir / "tokenizer").is_dir():
            from lowbit.data import Tokenizer

            return records.model_info(self.base, Tokenizer.load(run_dir / "tokenizer").vocab_size)
        return None


def _duration(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def _status_record(spec: RunSpec, cfg, result: dict) -> dict:
    return records.record(spec, cfg, "diverged" if result.get("diverged_at_step") is not None else "ok", result)


class _Progress:
    """The outer progress bar (one step per run) on a terminal; one line per run in logs."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None
        self.tty = sys.stderr.isatty()
        self.finished: list[tuple[bool, float]] = []

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from tqdm.auto import tqdm

            # no tqdm ETA (runs per second counts a reused run as free): ours, from what finished runs cost
            fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
            self.bar = tqdm(total=self.total, desc="compare", unit="run", position=0, leave=True,
                            disable=not self.tty, bar_format=fmt)
        return self

    def start(self, i: int, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"recipe {i}/{self.total}: {label}")
            if not self.tty:
                print(f"[compare] recipe {i}/{self.total}: {label}", file=sys.stderr, flush=True)

    def done(self, line: str, quantized: bool, wall_s, remaining: list[bool]) -> None:
        """A run finished (`wall_s`: its recorded wall time); `remaining`: quantized flags of the runs to go."""
        self.finished.append((quantized, wall_s if isinstance(wall_s, (int, float)) else float("nan")))
        if self.bar is None:
            return
        eta = records.eta_seconds(self.finished, remaining)
        left = f", ~{_duration(eta)} left" if eta else ""
        self.bar.set_postfix_str(left.lstrip(", "), refresh=False)
        self.bar.update(1)
        self.bar.write(f"[compare] {line}{left}", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_run(path: str | Path, label: str | None = None) -> Path:
    """The run directory for `lowbit eval/generate --ckpt PATH [--run LABEL]`: PATH itself, or, when PATH is a
    comparison directory (results.json + runs/), its run LABEL; without a LABEL the error lists the runs."""
    p = Path(path)
    runs = p / "runs"
    if not ((p / RESULTS_JSON).is_file() and runs.is_dir()):
        if label is not None:
            raise ValueError(f"--run {label} needs a comparison directory (lowbit compare's --out); {p} is not one")
        return p
    found = sorted(d.name for d in runs.iterdir() if d.is_dir())
    if label is None:
        raise ValueError(f"{p} is a comparison directory; pick one of its runs with --run LABEL: {', '.join(found)} "
                         f"(or pass --ckpt {runs}/LABEL)")
    if dirname(label) not in found:
        raise ValueError(f"no run {label!r} in {p}; its runs: {', '.join(found)}")
    return runs / dirname(label)


def samples(summary: dict, device) -> dict:
    """{label: text}: a continuation of SAMPLE_PROMPT from the reference and from the quantized run with the lowest
    validation loss, each from its run's fp32 master weights (what the model is after training), sampled at
    SAMPLE_TEMPERATURE with top-k SAMPLE_TOP_K from seed SAMPLE_SEED (the same draws for every run)."""
    import torch

    from lowbit.train.evaluation import load_run
    from lowbit.train.rundir import RunDir

    runs, ref = summary["runs"], summary.get("reference")
    ok = {lab: r for lab, r in runs.items() if r.get("status") == "ok" and RunDir(r["out"]).has_checkpoint()}
    quantized = [lab for lab, r in ok.items() if recipes.Recipe.from_dict(r["config"]["recipe"]).quantized
                 and records.finite(r.get("final_val_loss"))]
    best = min(quantized, key=lambda lab: ok[lab]["final_val_loss"], default=None)
    out = {}
    for label in dict.fromkeys(lab for lab in (ref, best) if lab in ok):
        try:
            model, tok, _, _, _ = load_run(ok[label]["out"], device, recipe="fp32")
        except (ValueError, OSError) as e:  # a sample is a courtesy: it never fails the comparison
            log.warning("no sample from %s: %s", label, e)
            continue
        idx = torch.tensor([tok.encode(SAMPLE_PROMPT)], dtype=torch.long, device=next(model.parameters()).device)
        gen = torch.Generator(device=idx.device).manual_seed(SAMPLE_SEED)
        new = model.generate(idx, SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K,
                             generator=gen)[0, idx.size(1):].tolist()
        out[label] = SAMPLE_PROMPT + tok.decode(new)
    return out
