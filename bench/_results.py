"""bench/RESULTS.md: each benchmark script owns one `## ...` section and rewrites only that one."""
from __future__ import annotations

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
