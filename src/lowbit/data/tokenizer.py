"""Tokenizers: byte-level BPE trained locally with Hugging Face ``tokenizers``, or raw bytes.

Both treat input text literally: the string "<|endoftext|>" inside a document is encoded as ordinary
text, so ``decode(encode(s)) == s`` for every string; the end-of-text id only enters the stream where
lowbit joins documents. Nothing is downloaded: BPE is trained on the corpus and cached under
``<cache>/tokenizers/bpe-<vocab>-<corpus hash>/``.

Saved layout (``Tokenizer.save(dir)``): ``lowbit_tokenizer.json`` (kind, vocab_size, eot) and, for BPE,
the Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from lowbit._io import atomic_write_text, cache_root, temp_dir

EOT = "<|endoftext|>"
_META = "lowbit_tokenizer.json"
_HF = "tokenizer.json"
KINDS = ("bpe", "bytes")


class Tokenizer:
    """Text <-> token ids. ``kind`` is "bpe" (wraps a ``tokenizers.Tokenizer``) or "bytes"
    (UTF-8 bytes 0..255, end-of-text 256, vocab 257)."""

    def __init__(self, kind: str, hf=None):
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
        if (kind == "bpe") != (hf is not None):
            raise ValueError("a 'bpe' Tokenizer needs a tokenizers.Tokenizer (and 'bytes' none)")
        self.kind = kind
        self._hf = hf
        if hf is not None:
            hf.encode_special_tokens = True  # "<|endoftext|>" in user text stays text
            eot = hf.token_to_id(EOT)
            if eot is None:
                raise ValueError(f"BPE tokenizer has no {EOT!r} token; train it with lowbit.data.train_bpe")
            self.eot_id = int(eot)
            self.vocab_size = int(hf.get_vocab_size())
        else:
            self.eot_id = 256
            self.vocab_size = 257

    def backend_json(self) -> str | None:
        """The BPE model as `tokenizers` JSON (what `tokenizers.Tokenizer.from_str` reads); None for "bytes"."""
        return None if self._hf is None else self._hf.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        if self._hf is None:
            return list(text.encode("utf-8"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like ``[encode(t) for t in texts]``; BPE runs the batch on all cores."""
        if self._hf is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Ids -> text; the end-of-text id becomes "<|endoftext|>", invalid UTF-8 (a model may emit a
        partial character) becomes U+FFFD rather than an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range for vocab_size {self.vocab_size}")
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        parts, cur = [], []
        for i in ids:
            if i == self.eot_id:
                parts.append(bytes(cur).decode("utf-8", errors="replace") + EOT)
                cur = []
            else:
                cur.append(i)
        parts.append(bytes(cur).decode("utf-8", errors="replace"))
        return "".join(parts)

    @property
    def hash(self) -> str:
        """sha256 identifying the token mapping (used as a cache key for token shards)."""
        spec = "bytes-v1" if self._hf is None else self._hf.to_str()
        return hashlib.sha256(spec.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer into directory ``path`` (created; files replaced atomically)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        if self._hf is not None:
            atomic_write_text(d / _HF, self._hf.to_str())
        return self.save_meta(d)

    def save_meta(self, path: str | os.PathLike) -> Path:
        """Write only lowbit's metadata file (kind, vocab_size, eot) into directory ``path``: beside a Hugging
        Face ``tokenizer.json`` written by ``save_pretrained``, that makes the directory ``Tokenizer.load``-able."""
        d = Path(path)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "eot_token": EOT}
        atomic_write_text(d / _META, json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        d = Path(path)
        if not (d / _META).is_file():
            raise FileNotFoundError(f"{d} has no {_META}; expected a directory written by Tokenizer.save")
        meta = json.loads((d / _META).read_text())
        if meta["kind"] == "bytes":
            tok = cls("bytes")
        else:
            from tokenizers import Tokenizer as HFTokenizer
            tok = cls("bpe", HFTokenizer.from_file(str(d / _HF)))
        if (tok.vocab_size, tok.eot_id) != (meta["vocab_size"], meta["eot_id"]):
            raise ValueError(f"tokenizer in {d} is inconsistent with its {_META}: "
                             f"vocab {tok.vocab_size} eot {tok.eot_id} vs {meta}; delete and re-create it")
        return tok


def train_bpe(texts: list[str], vocab_size: int = 2048, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no normalization, full 256-byte
    alphabet so every string is encodable) with ``<|endoftext|>`` as id 0. A small corpus may
    yield fewer than ``vocab_size`` tokens; ``Tokenizer.vocab_size`` is the real size."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 or vocab_size > 2**32 - 1:
        raise ValueError(f"BPE vocab_size must be >= 257 (256 bytes + {EOT}), got {vocab_size}; "
                         f"use --tokenizer bytes for a byte-level vocabulary")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return Tokenizer("bpe", hf)


def get_tokenizer(kind: str = "bpe", vocab_size: int = 2048, texts: list[str] | None = None, *,
                  cache_dir: str | os.PathLike | None = None, corpus_id: str | None = None,
                  progress: bool = False) -> Tokenizer:
    """A tokenizer by kind. ``kind``: "bytes", "bpe" (trained on ``texts``, cached by
    (corpus hash, vocab_size) under the cache dir), or a directory written by ``Tokenizer.save``.
    ``corpus_id`` (the corpus hash) skips re-hashing ``texts`` when the caller already has it."""
    from .corpus import corpus_hash

    if kind == "bytes":
        return Tokenizer("bytes")
    if kind != "bpe":
        if Path(kind).is_dir():
            return Tokenizer.load(kind)
        raise ValueError(f"unknown tokenizer {kind!r}; choose 'bpe', 'bytes' or a saved tokenizer directory")
    if not texts:
        raise ValueError("training a BPE tokenizer needs texts (the corpus documents)")
    cid = corpus_id or corpus_hash(texts)
    d = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{cid[:16]}"
    if (d / _META).is_file():
        return Tokenizer.load(d)
    tok = train_bpe(texts, vocab_size, progress=progress)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(d.parent, ".tmp-")
    try:
        tok.save(tmp)
        try:
            os.rename(tmp, d)
        except OSError:
            if not (d / _META).is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok
