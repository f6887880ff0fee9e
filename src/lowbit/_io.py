"""Small file helpers with one owner each: hashing, JSON-safe conversion, atomic writes, flat TOML."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_safe(x):
    """Non-finite floats -> None (strict JSON); tuples -> lists; paths -> str; dict keys -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(dir: str | os.PathLike | None, prefix: str) -> Path:
    """tempfile.mkdtemp, but with the mode mkdir would give (0o777 minus the umask), not 0o700: the directory is
    renamed into place when complete and must not stay private."""
    path = Path(tempfile.mkdtemp(dir=dir, prefix=prefix))
    path.chmod(0o777 & ~_umask())
    return path


def publish_modes(root: str | os.PathLike) -> None:
    """Give `root`, every directory and every file under it the mode mkdir/open would have given (0o777 / 0o666
    minus the umask): safetensors and mkstemp write 0o600, which would stay once renamed into place."""
    mask = _umask()
    Path(root).chmod(0o777 & ~mask)
    for p in Path(root).rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place: readers see the old
    file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # unique: concurrent writers are safe
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0o600 would stay with the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    """Atomic strict-JSON write of `data` (made json_safe first), indented, with a trailing newline."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


def toml_value(v) -> str:
    """A TOML literal for a bool, number, string or list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # JSON's string escapes (\\, \", \n, \uXXXX for control characters) are TOML basic-string escapes too;
        # DEL is the one character TOML forbids raw that JSON leaves alone
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(d: dict) -> str:
    """TOML of a dict: scalar keys first, then one [table] per nested dict (one level), None values left
    out (they take their defaults on load)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The lowbit cache directory: ``cache_dir`` if given, else ``$LOWBIT_CACHE``, else
    ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``. Not created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lowbit"
    return Path.home() / ".cache" / "lowbit"
