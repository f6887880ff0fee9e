"""The "did you mean ...?" of lowbit's error messages (torch-free)."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """" (did you mean X?)" with the option closest to `word` (difflib's ratio >= cutoff), else ""."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""
