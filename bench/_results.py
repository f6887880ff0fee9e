"""Helpers shared by the benchmarks: bench/RESULTS.md sections (each script owns one `## ...` section and
rewrites only that one), the benchmark corpus, the machine's load and CPU description."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(section: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section titled `section` (the `## ...` line) with `text`, or append it; others untouched."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip("\n") + "\n\n"
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc.rstrip("\n") + "\n")


def corpus_file(d: Path, max_chars: int = 3_000_000) -> Path:
    """A text file made of this Python's stdlib sources (deterministic for a given Python install)."""
    src = Path(os.__file__).parent
    parts, n = [], 0
    for p in sorted(src.glob("*.py")):
        t = p.read_text(errors="replace")
        parts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    path = d / "stdlib.txt"
    path.write_text("\n".join(parts)[:max_chars])
    return path


def load_avg() -> str:
    """The 1-minute load average, for the record of how busy the machine was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def cpu_description() -> str:
    """The CPU model and its matrix/vector flags that change what bf16 and fp32 GeMMs cost (lscpu's view)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(keep) or 'no AVX2/AVX-512/AMX flags'})"


def machine_meta(dev, load_before: float) -> dict:
    """What produced a benchmark: device (CPU model and flags, or the GPU), cores, threads, torch, and the
    1-minute load average before and now. `dev`: a torch.device."""
    import torch

    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()
    return {"device": device, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"}


def timeit(fn, repeats: int, sync, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed ones; sync() (e.g.
    torch.cuda.synchronize) before each clock read so asynchronous devices are timed whole."""
    import time

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def alternate(a, b, pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `pairs` calls of a() and of b(), called alternately with the order swapped each pair, so
    a machine whose speed drifts over minutes slows both alike (compare them pair by pair)."""
    import time

    times: tuple[list[float], list[float]] = ([], [])
    for i in range(pairs):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (a, b)[k]()
            times[k].append(time.perf_counter() - t0)
    return times
