"""--data debian-docs: the .deb container read in Python, only the reStructuredText sources kept, the pinned
checksum, the cache, a missing package client, and the built-in corpus names. apt-get is a stand-in script."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lowbit.data import corpus, docs

PREFIX = "./usr/share/doc/pkg-doc/html/_sources/"
FILES = {PREFIX + "b/intro.rst.txt": "Second file.\r\n", PREFIX + "a.rst.txt": "First file.\n",
         PREFIX + "page.html": "<p>not a source</p>", "./usr/share/doc/pkg-doc/copyright": "GPL-2",
         PREFIX + "../../../../../../tmp/evil.txt": "escape"}


def _ar(members: dict[str, bytes]) -> bytes:
    """A Unix ar archive, written from the format description (header fields are space-padded ASCII)."""
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def make_deb(path: Path, files=FILES) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buf.getvalue()}))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pkg(sha: str) -> docs.DebPackage:
    return docs.DebPackage("pkg-doc", "1.0-1", sha, PREFIX, "GPL-2.0", "pool/main/p/pkg")


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """apt-get on PATH that copies the prepared .deb into its working directory and logs its arguments."""
    deb = tmp_path / "src" / "pkg-doc_1.0-1_all.deb"
    deb.parent.mkdir()
    sha = make_deb(deb)
    bindir, log = tmp_path / "bin", tmp_path / "apt.log"
    bindir.mkdir()
    (bindir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncp {deb} .\n")
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LOWBIT_OFFLINE", raising=False)
    return _pkg(sha), log


def test_ar_reader_matches_gnu_ar(tmp_path):
    if shutil.which("ar") is None:
        pytest.skip("GNU ar not installed")
    blob = _ar({"one": b"abc", "two.txt": b"hello world!"})
    (tmp_path / "x.a").write_bytes(blob)
    listed = subprocess.run(["ar", "t", str(tmp_path / "x.a")], capture_output=True, text=True, check=True).stdout
    assert listed.split() == list(docs.ar_members(blob)) == ["one", "two.txt"]
    assert docs.ar_members(blob)["two.txt"] == b"hello world!"  # odd-length member before it: padding handled
    with pytest.raises(ValueError, match="not an ar archive"):
        docs.ar_members(b"PK\x03\x04")


def test_fetch_extract_cache(fake_apt, private_cache):
    pkg, log = fake_apt
    got = docs.load_docs(packages=(pkg,))
    assert got == ["First file.\n", "Second file.\n"]  # sources only, sorted by path, \r\n normalized
    assert log.read_text().split() == ["download", "pkg-doc=1.0-1"]
    assert not any(private_cache.rglob("evil.txt")) and not Path("/tmp/evil.txt").exists()
    assert docs.load_docs(packages=(pkg,)) == got and len(log.read_text().splitlines()) == 1  # cached


def test_checksum_mismatch_names_the_file(fake_apt, private_cache):
    pkg, _ = fake_apt
    bad = docs.DebPackage(**{**pkg.__dict__, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match=r"checksum mismatch for .*pkg-doc_1.0-1_all.deb.*delete it"):
        docs.load_docs(packages=(bad,))


def test_no_package_client_error_names_the_fix(private_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get anywhere
    monkeypatch.delenv("LOWBIT_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match=r"apt-get .* not on PATH\nFix: .*snapshot\.debian\.org.*put it at"):
        docs.load_docs(packages=(_pkg("0" * 64),))


def test_offline_refuses_to_download(private_cache, monkeypatch):
    monkeypatch.setenv("LOWBIT_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="LOWBIT_OFFLINE is set"):
        docs.load_docs(packages=(_pkg("0" * 64),))


def test_pinned_packages_are_the_measured_ones():
    assert [(p.name, p.version) for p in docs.DOCS_PACKAGES] == [("linux-doc-6.1", "6.1.176-1"),
                                                               ("python3.11-doc", "3.11.2-6+deb12u8")]
    assert all(len(p.sha256) == 64 and p.licence for p in docs.DOCS_PACKAGES)


def test_named_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert corpus.named_sources("debian-docs+shakespeare") == ["debian-docs", "shakespeare"]
    assert corpus.named_sources("corpus.txt") == []
    (tmp_path / "shakespeare").mkdir()  # a directory of that name is the user's data, not the built-in corpus
    assert corpus.named_sources("shakespeare") == []
    with pytest.raises(ValueError, match="twice"):
        corpus.named_sources("debian-docs+debian-docs")


def test_combined_corpus_concatenates_in_order(monkeypatch):
    monkeypatch.setitem(corpus.NAMED_CORPORA, "debian-docs", lambda cache: ["doc one", "doc two"])
    monkeypatch.setitem(corpus.NAMED_CORPORA, "shakespeare", lambda cache: ["sonnet"])
    assert corpus.load_corpus("shakespeare+debian-docs") == ["sonnet", "doc one", "doc two"]
