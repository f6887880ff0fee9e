"""Token shards: the corpus tokenized once into a flat ``np.memmap``, cached and split train/val.

Stream: ``doc_0 <eot> doc_1 <eot> ... doc_n <eot>`` (end-of-text after every document, GPT-2 style),
uint16 when every id fits (vocab_size <= 65536), else uint32.

Split: the validation set is the last ``floor(val_fraction * n_tokens)`` tokens of the stream and
the training set is everything before it. Documents come in a deterministic order (sorted paths),
tokenization is deterministic, so the split is identical across runs and machines, works for a
single-document corpus, and changing ``val_fraction`` does not require re-tokenizing: both splits
are views (``np.memmap`` with an offset) into one cached ``tokens.bin``.

Cache: ``<cache>/datasets/<corpus hash>-<tokenizer hash>/`` holding ``tokens.bin``, ``meta.json`` and
the ``tokenizer/``, written into a temp dir and renamed into place, so a crash never leaves a
half-written shard that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit._io import cache_root, temp_dir

from .corpus import corpus_hash, load_corpus
from .tokenizer import Tokenizer, get_tokenizer

_FORMAT = 1
_CHUNK_CHARS = 1 << 20  # tokenize in ~1M-character pieces: bounded memory, parallel, progress
_BATCH_CHARS = max(4, os.cpu_count() or 1) << 20  # characters per encode_batch call (~1 chunk per core)


@dataclass
class Dataset:
    """``train``/``val``: 1-D read-only np.memmap of token ids (uint16 or uint32; ``val`` is an empty
    array when val_fraction is 0). ``meta``: sizes, hashes, split and cache path."""

    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def split_chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters such that tokenizing the pieces one by
    one gives exactly the tokens of the whole text. Cuts go right after a newline that sits between
    two non-whitespace characters: there GPT-2 pre-tokenization always ends a pre-token ("\\n" alone),
    and BPE never merges across pre-tokens. A text without such a point stays whole."""
    out, start, n = [], 0, len(text)
    while n - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not (0 < cut and cut + 1 < n and not text[cut - 1].isspace()
                                 and not text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        out.append(text[start: cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


def _show_progress(progress: bool | None, n_chars: int) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty() and n_chars > 2_000_000  # only worth a bar past a second or so


def tokenize_to_file(docs: list[str], tok: Tokenizer, path: Path, progress: bool = False) -> int:
    """Write the token stream of ``docs`` (each followed by end-of-text) to ``path`` as raw ids of
    ``token_dtype(tok.vocab_size)``. Returns the number of tokens."""
    from tqdm import tqdm

    dtype = token_dtype(tok.vocab_size)
    eot = np.array([tok.eot_id], dtype=dtype)
    total = sum(len(d) for d in docs)
    n = 0
    with open(path, "wb") as f, tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing",
                                     disable=not progress) as bar:
        batch, batch_chars = [], 0  # (chunk, is_last_chunk_of_doc)

        def flush():
            nonlocal n
            if tok.kind == "bytes":  # ids are the UTF-8 bytes: skip the Python int lists
                ids = [np.frombuffer(c.encode("utf-8"), dtype=np.uint8) for c, _ in batch]
            else:
                ids = tok.encode_batch([c for c, _ in batch])
            for (chunk, last), seq in zip(batch, ids):
                arr = np.asarray(seq, dtype=dtype)
                arr.tofile(f)
                n += len(arr)
                if last:
                    eot.tofile(f)
                    n += 1
                bar.update(len(chunk))
            batch.clear()

        for d in docs:
            chunks = split_chunks(d)
            for j, c in enumerate(chunks):
                batch.append((c, j == len(chunks) - 1))
                batch_chars += len(c)
                if batch_chars >= _BATCH_CHARS:
                    flush()
                    batch_chars = 0
        if batch:
            flush()
    return n


def _build_shard(docs: list[str], tok: Tokenizer, out: Path, meta: dict, progress: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, ".tmp-")
    try:
        n = tokenize_to_file(docs, tok, tmp / "tokens.bin", progress)
        tok.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps({**meta, "n_tokens": n}, indent=2) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_dataset(data: str | os.PathLike | None = None, tokenizer: str | Tokenizer = "bpe",
                    vocab_size: int = 2048, val_fraction: float = 0.05,
                    cache_dir: str | os.PathLike | None = None, *, max_chars: int | None = None,
                    progress: bool | None = None) -> Dataset:
    """Load the corpus (``load_corpus(data)``), get the tokenizer (``tokenizer``: "bpe" trained on the
    corpus with ``vocab_size``, "bytes", a saved tokenizer directory, or a ``Tokenizer``), tokenize
    into a cached memmap and split it (tail ``val_fraction`` of the tokens is validation).
    ``progress``: None shows a tqdm bar only on a terminal for large corpora."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = load_corpus(data, cache_dir=cache_dir, max_chars=max_chars)
    n_chars = sum(len(d) for d in docs)
    chash = corpus_hash(docs)
    show = _show_progress(progress, n_chars)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = get_tokenizer(tokenizer, vocab_size, docs, cache_dir=cache_dir, corpus_id=chash, progress=show)
    thash = tok.hash
    out = cache_root(cache_dir) / "datasets" / f"{chash[:16]}-{thash[:16]}"
    base = {"format": _FORMAT, "corpus_hash": chash, "tokenizer_hash": thash, "tokenizer_kind": tok.kind,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": token_dtype(tok.vocab_size).name,
            "n_docs": len(docs), "n_chars": n_chars}
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        _build_shard(docs, tok, out, base, show)
    meta = json.loads(meta_path.read_text())
    if {k: meta.get(k) for k in base} != base:
        raise RuntimeError(f"token cache {out} does not match this corpus/tokenizer ({meta_path}); "
                           f"delete {out} and run again")
    n = meta["n_tokens"]
    dtype = np.dtype(meta["dtype"])
    if (out / "tokens.bin").stat().st_size != n * dtype.itemsize:
        raise RuntimeError(f"token cache {out / 'tokens.bin'} has the wrong size; delete {out} and run again")
    n_val = int(n * val_fraction)
    n_train = n - n_val
    if n_train < 2 or (val_fraction > 0 and n_val < 2):
        raise ValueError(f"corpus has only {n} tokens: too few for a train/val split with "
                         f"val_fraction={val_fraction}; use more data")
    train = np.memmap(out / "tokens.bin", dtype=dtype, mode="r", shape=(n_train,))
    val = (np.memmap(out / "tokens.bin", dtype=dtype, mode="r", offset=n_train * dtype.itemsize, shape=(n_val,))
           if n_val else np.zeros(0, dtype=dtype))
    meta.update(n_train=n_train, n_val=n_val, val_fraction=val_fraction, path=str(out),
                data=None if data is None else os.fspath(data), max_chars=max_chars)
    return Dataset(train=train, val=val, tokenizer=tok, meta=meta)
