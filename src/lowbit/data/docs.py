"""The ``debian-docs`` corpus: documentation sources from two Debian packages, about 35 MB of text.

``--data debian-docs`` trains on the reStructuredText sources (``html/_sources/**/*.txt``) of

* ``linux-doc-6.1`` (the Linux kernel's documentation; GPL-2.0, parts dual-licensed CC-BY-4.0), and
* ``python3.11-doc`` (the Python 3.11 documentation; PSF License v2),

one document per source file, sorted by package then path. The ``.deb`` files come from Debian's
archive with ``apt-get download PKG=VERSION`` (apt checks them against the signed archive index),
are checked again here against the sha256 pinned below, and are read in Python (the ``ar`` container
and its ``data.tar.xz``; nothing is installed). The extracted sources are cached under
``<cache>/debian-docs-<version key>/`` like the Shakespeare corpus. Debian keeps only the newest point
release of a package in its main archive: when a pinned version is gone from it, the error names the
snapshot.debian.org URL of the exact file, to be downloaded by hand into the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lowbit._io import cache_root, sha256_file, temp_dir


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    sources: str  # member prefix of the reStructuredText sources inside data.tar
    licence: str
    pool: str  # path under a Debian mirror

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"

    @property
    def urls(self) -> str:
        """Where the file can be downloaded by hand: the archive while Debian carries this version, then
        the snapshot archive (a timestamp at which this version was current)."""
        return (f"https://deb.debian.org/debian/{self.pool}/{self.filename} or "
                f"https://snapshot.debian.org/archive/debian/20261201T000000Z/{self.pool}/{self.filename}")


DOCS_PACKAGES = (
    DebPackage("linux-doc-6.1", "6.1.176-1",
               "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
               "./usr/share/doc/linux-doc-6.1/html/_sources/",
               "GPL-2.0 (Linux kernel documentation; some files dual-licensed CC-BY-4.0)", "pool/main/l/linux"),
    DebPackage("python3.11-doc", "3.11.2-6+deb12u8",
               "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
               "./usr/share/doc/python3.11/html/_sources/",
               "PSF License Version 2 (Python documentation)", "pool/main/p/python3.11"),
)


def _docs_error(pkg: DebPackage, root: Path, why: str) -> RuntimeError:
    return RuntimeError(
        f"cannot get {pkg.name} {pkg.version} for --data debian-docs: {why}\nFix: on a Debian-based machine lowbit "
        f"runs `apt-get download {pkg.name}={pkg.version}`; elsewhere (or once Debian has dropped this version) "
        f"download {pkg.urls} and put it at {root / pkg.filename}; or train on other text with --data PATH."
    )


def _download_deb(pkg: DebPackage, root: Path) -> Path:
    """``apt-get download`` into a temporary directory of ``root``, then rename (atomic)."""
    if os.environ.get("LOWBIT_OFFLINE", "") not in ("", "0"):
        raise _docs_error(pkg, root, f"LOWBIT_OFFLINE is set and {root / pkg.filename} is not cached")
    apt = shutil.which("apt-get")
    if apt is None:
        raise _docs_error(pkg, root, "apt-get (Debian's package client) is not on PATH")
    root.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lowbit.data").info("downloading %s=%s with apt-get (once) into %s", pkg.name, pkg.version, root)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        try:
            proc = subprocess.run([apt, "download", f"{pkg.name}={pkg.version}"], cwd=tmp,
                                  capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _docs_error(pkg, root, f"apt-get download failed ({e})") from e
        src = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not src.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            raise _docs_error(pkg, root, f"apt-get download failed (exit {proc.returncode}); it said:\n{tail}")
        os.replace(src, root / pkg.filename)
    return root / pkg.filename


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a ``.deb`` is one): name -> bytes."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb file starts with '!<arch>')")
    out, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are padded to an even offset
    return out


def _extract_sources(deb: Path, pkg: DebPackage, dst: Path) -> int:
    """Write ``pkg.sources**/*.txt`` of the .deb's data.tar under ``dst`` (by name, never tar.extract).
    Returns the number of files."""
    members = ar_members(deb.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise RuntimeError(f"{deb} has no data.tar member; delete it so lowbit downloads it again")
    n = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            rel = m.name[len(pkg.sources):] if m.name.startswith(pkg.sources) else None
            if not (m.isfile() and rel and rel.endswith(".txt")) or ".." in rel.split("/"):
                continue
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
            n += 1
    return n


def _version_key(packages) -> str:
    return hashlib.sha256("|".join(p.sha256 for p in packages).encode()).hexdigest()[:12]


def docs_dir(cache_dir=None, *, packages=DOCS_PACKAGES) -> Path:
    """Directory holding ``<package>/<path>.txt`` for every package, fetched and extracted on first use."""

    root = cache_root(cache_dir)
    out = root / f"debian-docs-{_version_key(packages)}"
    if out.is_dir():
        return out
    tmp = temp_dir(root if root.is_dir() else None, ".docs-")
    try:
        for pkg in packages:
            deb = root / pkg.filename
            if not deb.is_file():
                deb = _download_deb(pkg, root)
            digest = sha256_file(deb)
            if digest != pkg.sha256:
                raise RuntimeError(f"checksum mismatch for {deb}: sha256 {digest}, expected {pkg.sha256} "
                                   f"({pkg.name} {pkg.version}); delete it so lowbit downloads it again")
            if _extract_sources(deb, pkg, tmp / pkg.name) == 0:
                raise RuntimeError(f"{deb} holds no {pkg.sources}*.txt sources; is it {pkg.name}?")
        root.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_docs(cache_dir=None, *, packages=DOCS_PACKAGES) -> list[str]:
    """The ``debian-docs`` corpus: one document per source file, package order then sorted relative path.
    Bytes that are not UTF-8 (a handful of legacy files) are replaced with U+FFFD."""
    d = docs_dir(cache_dir, packages=packages)
    docs = []
    for pkg in packages:
        base = d / pkg.name
        for p in sorted(base.rglob("*.txt"), key=lambda q: q.relative_to(base).as_posix()):
            docs.append(p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n"))
    return docs
