"""lowbit's built-in offline tasks and the task names `lowbit eval --tasks` accepts (no lm-eval import here).

Built-in tasks are written as lm-eval task YAML + JSONL under `<cache>/eval_tasks/<key>/` (key: the builder's
version, the corpus hash and the item count), so lm-eval's TaskManager registers them from that folder with no
hub access. Hub tasks (hellaswag, boolq, ...) pass through to lm-eval unchanged.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lowbit._io import atomic_write_text, cache_root

from . import items

BUILDER_VERSION = 1
N_ITEMS = 500
PREFIX = "lowbit_"


@dataclass(frozen=True)
class BuiltinTask:
    corpus: str      # a named corpus of lowbit.data.corpus
    form: str        # "next_line" or "last_word"
    chance: float    # accuracy of guessing

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc", "acc_norm") if self.form == "next_line" else ("acc", "perplexity")


BUILTIN = {f"{PREFIX}{c.replace('-', '_')}_{form}": BuiltinTask(c, form, 0.25 if form == "next_line" else 0.0)
           for c in ("shakespeare", "debian-docs") for form in ("next_line", "last_word")}
# the FP4 paper's nine zero-shot tasks (arXiv 2501.17116, Table 2), by their lm-eval names; need the hub
GROUPS = {"fp4-paper": ["piqa", "hellaswag", "openbookqa", "arc_challenge", "arc_easy", "boolq", "logiqa", "sciq",
                        "lambada_openai"],
          "lowbit": list(BUILTIN)}
FORMS = {"next_line": "next line among 4 (HellaSwag's form)", "last_word": "last word, greedy (LAMBADA's form)"}


def expand(names: str | list[str]) -> list[str]:
    """'a,b,fp4-paper' -> task names, groups expanded, order kept, duplicates dropped."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    out = []
    for p in (p.strip() for p in parts):
        if not p:
            continue
        out += GROUPS.get(p, [p])
    if not out:
        raise ValueError("--tasks is empty; name tasks, e.g. --tasks lowbit (`lowbit eval --list-tasks`)")
    return list(dict.fromkeys(out))


def _yaml(name: str, task: BuiltinTask, data_file: Path) -> str:
    common = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
              f"    validation: {json.dumps(str(data_file))}", "validation_split: validation",
              'doc_to_text: "{{context}}"']
    if task.form == "next_line":  # the context ends with a newline; the choices are whole lines
        body = ["output_type: multiple_choice", 'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"',
                'target_delimiter: ""']
    else:  # the target carries its leading space
        body = ["output_type: loglikelihood", 'doc_to_target: "{{target}}"', 'target_delimiter: ""']
    metrics = ["metric_list:"] + [f"  - metric: {m}\n    aggregation: {'perplexity' if m == 'perplexity' else 'mean'}"
                                  f"\n    higher_is_better: {'false' if m == 'perplexity' else 'true'}"
                                  for m in task.metrics]
    return "\n".join(common + body + metrics + ["metadata:", f"  version: {BUILDER_VERSION}.0", ""])


def build_items(name: str, cache_dir=None) -> list[dict]:
    """The items of built-in task `name` (deterministic: seed 0)."""
    from lowbit.data.corpus import load_corpus

    task = BUILTIN[name]
    pieces = items.source_pieces(load_corpus(task.corpus, cache_dir=cache_dir))
    build = items.next_line_items if task.form == "next_line" else items.last_word_items
    return build(pieces, N_ITEMS, seed=0)


def task_dir(names: list[str], cache_dir=None) -> Path:
    """A folder holding the YAML + JSONL of the built-in tasks among `names` (built once, then cached)."""
    from lowbit.data.corpus import corpus_hash, load_corpus

    wanted = [n for n in names if n in BUILTIN]
    corpora = {BUILTIN[n].corpus for n in wanted}
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, N_ITEMS, sorted(
        (c, corpus_hash(load_corpus(c, cache_dir=cache_dir))) for c in corpora)]).encode()).hexdigest()[:16]
    root = cache_root(cache_dir) / "eval_tasks" / key
    for name in wanted:
        if (root / f"{name}.yaml").is_file():
            continue
        root.mkdir(parents=True, exist_ok=True)
        rows = build_items(name, cache_dir)
        atomic_write_text(root / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(root / f"{name}.yaml", _yaml(name, BUILTIN[name], root / f"{name}.jsonl"))
    return root


def passages(root: Path, name: str) -> list[str]:
    """The passage (context + answer, contiguous in the corpus) of every item of built-in task `name`."""
    return [json.loads(line)["passage"] for line in (root / f"{name}.jsonl").read_text().splitlines()]


def check_held_out(name: str, root: Path, run_data: str | None, val_text: str) -> None:
    """Refuse built-in task `name` on a run whose training split may hold its items: when the run trained on
    the task's corpus, every item's passage must lie inside the run's (decoded) validation text."""
    from lowbit.data.corpus import named_sources

    corpus = BUILTIN[name].corpus
    if corpus not in (named_sources(run_data) if run_data else ["shakespeare"]):
        return  # the run never saw this corpus: out of domain, but nothing leaked
    outside = sum(p not in val_text for p in passages(root, name))
    if outside:
        raise ValueError(f"{outside} items of {name} are not in this run's validation split (the last "
                         f"{items.SOURCE_FRACTION:.0%} of {corpus}, which its val_fraction must cover): the model "
                         f"may have trained on them; evaluate a run with val_fraction >= 0.05")


def list_rows(cache_dir=None) -> list[dict]:
    """One row per built-in task: name, corpus, form, items, chance, metrics."""
    rows = []
    for name, t in BUILTIN.items():
        root = task_dir([name], cache_dir)
        n = len((root / f"{name}.jsonl").read_text().splitlines())
        rows.append({"task": name, "corpus": t.corpus, "form": FORMS[t.form], "items": n,
                     "chance": t.chance, "metrics": ", ".join(t.metrics)})
    return rows
