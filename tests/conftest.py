"""Shared test fixtures: small local corpora (no network), a private token cache, and Trainer subclasses
that inject faults through the Trainer's own factories (never by patching module globals)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

KINGS = ["the", "king", "queen", "rides", "to", "a", "castle", "and", "sleeps", "knight"]
RIVERS = KINGS + ["sword", "river"]
FOXES = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "sleeps"]


def word_lines(words: list[str], n: int, step_i: int, step_j: int, base: int, spread: int, drift: int = 0) -> str:
    """n deterministic sentences: word (i·step_i + j·step_j + i // drift) of `words`, base + i % spread words each."""
    def word(i, j):
        return words[(i * step_i + j * step_j + (i // drift if drift else 0)) % len(words)]
    return "\n".join(" ".join(word(i, j) for j in range(base + i % spread)) + "." for i in range(n))


def grammar_text(n_sentences: int = 3000, seed: int = 0) -> str:
    """Sentences from a small grammar: clear structure (a model can beat the byte unigram entropy by far)."""
    rng = random.Random(seed)
    adj = ["old", "young", "brave", "quiet", "golden", "dark"]
    noun = ["king", "queen", "knight", "horse", "castle", "river", "sword", "crown"]
    verb = ["sees", "loves", "guards", "crosses", "finds", "leaves"]
    lines = []
    for _ in range(n_sentences):
        s = f"the {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the {rng.choice(noun)}"
        if rng.random() < 0.3:
            s += f" and the {rng.choice(noun)}"
        lines.append(s + ".")
    return "\n".join(lines) + "\n"


CORPORA = {
    "kings": lambda: word_lines(KINGS, 600, 7, 3, 6, 5) + "\n",          # ~20 kB: CLI and bad-input runs
    "rivers": lambda: word_lines(RIVERS, 2000, 7, 5, 5, 7, drift=3) + "\n",  # ~60 kB: crash and multi-process runs
    "foxes": lambda: word_lines(FOXES, 400, 7, 3, 8, 5),                 # ~20 kB: comparisons
    "grammar": grammar_text,                                              # ~120 kB: learning tests
}


def write_corpus(directory: Path, kind: str) -> Path:
    p = Path(directory) / "corpus.txt"
    p.write_text(CORPORA[kind]())
    return p


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """LOWBIT_CACHE in this test's tmp_path: never the user's cache, never the network."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(request, tmp_path, private_cache) -> Path:
    """The test module's corpus (its module-level CORPUS, a CORPORA key) as a file in tmp_path, with a private
    token cache."""
    return write_corpus(tmp_path, request.module.CORPUS)


@pytest.fixture(scope="module")
def module_corpus(request, tmp_path_factory) -> Path:
    """The same, written once per test module (for module-scoped runs)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), request.module.CORPUS)


def sylvester(n: int):
    """The n×n Sylvester-Hadamard matrix (entries ±1, float64 torch tensor), by Kronecker doubling."""
    import torch

    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def fp32_compute(name: str, directory: Path) -> str:
    """Recipe `name` with compute_dtype fp32, saved as a .toml in `directory`: the same FP4/FP8 quantization of
    every GeMM operand, with the (fake-quantized) GeMMs in fp32 (CPU bf16 GeMMs without bf16 units are ~15x
    slower)."""
    from lowbit import recipes

    path = Path(directory) / f"{name}-fp32.toml"
    recipes.save(recipes.get(name).replace(compute_dtype="fp32", name=f"{name}-fp32"), path)
    return str(path)


def final_weights(out: Path) -> dict:
    """The newest checkpoint's weights of run directory `out`: model.safetensors, or FSDP2 shards gathered."""
    from lowbit.train import checkpoint, weights

    return weights.read_weights(checkpoint.list_checkpoints(Path(out) / "ckpt")[0][1])


def trainer_with_batch_hook(hook):
    """A Trainer subclass whose training batcher calls hook(batches_drawn_so_far) before every batch: a crash
    or a signal at a chosen point of the run."""
    from lowbit.train import Trainer

    class HookedTrainer(Trainer):
        def make_batcher(self, *args, **kw):
            batcher = super().make_batcher(*args, **kw)
            real_next = batcher.next

            def next_():
                hook(batcher.step)
                return real_next()

            batcher.next = next_
            return batcher

    return HookedTrainer
