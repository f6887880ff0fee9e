"""Zero-shot task items built from held-out text: pure functions, no lm-eval, no torch.

Two forms, each the shape of a task the field reports:

- next line (HellaSwag's form): a passage of up to CONTEXT_LINES lines, then four candidate next lines: the
  true one and three lines of similar length drawn from elsewhere in the held-out text. Chance: 1/4.
- last word (LAMBADA's form): a passage whose final word is to be predicted; right only when greedy decoding
  produces exactly that word. Chance: about 0 (one word out of the vocabulary).

Items come only from the tail SOURCE_FRACTION of a corpus's characters, which lies inside the validation split
of every run on that corpus with val_fraction >= about 2x that (the trainer's default is 0.05);
`lowbit.downstream.tasks.check_held_out` verifies it per run. Everything is deterministic from the text and
the seed.
"""
from __future__ import annotations

import random
import re

SOURCE_FRACTION = 0.02   # the tail of the corpus the items come from
CONTEXT_LINES = 3        # lines of passage before the line or word to predict
MIN_LINE, MAX_LINE = 20, 120  # characters of a candidate line: short ones ("[Exit.]") are guessable by length
LENGTH_SLACK = 0.25      # a distractor's length is within 25% of the true line's
MIN_DISTANCE = 50        # lines between a distractor and the true line: not from the same passage
_LAST_WORD = re.compile(r"^(.* )([A-Za-z]{3,})[^A-Za-z0-9]*$")


def source_pieces(docs: list[str], fraction: float = SOURCE_FRACTION) -> list[str]:
    """The last `fraction` of the characters of `docs` (in corpus order), as one piece per document it
    touches; the first piece starts at a line boundary so no item begins mid-line."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    left = int(sum(map(len, docs)) * fraction)
    pieces = []
    for doc in reversed(docs):
        if left <= 0:
            break
        take = doc[-left:] if left < len(doc) else doc
        if len(take) < len(doc):
            take = take[take.find("\n") + 1:] if "\n" in take else ""
        pieces.append(take)
        left -= len(doc)
    return [p for p in reversed(pieces) if p]


def _lines(pieces: list[str]) -> list[tuple[int, str]]:
    """(paragraph number, line) for every non-blank line: a passage never spans a blank line or a document
    boundary, so it is a contiguous stretch of the text."""
    out, para = [], 0
    for piece in pieces:
        para += 1
        for ln in piece.split("\n"):
            if ln.strip():
                out.append((para, ln.rstrip()))
            else:
                para += 1
    return out


def _spread(candidates: list[int], n: int) -> list[int]:
    """At most n of the candidates, evenly spaced through the text (not just its first pages)."""
    if len(candidates) <= n:
        return candidates
    step = len(candidates) / n
    return [candidates[int(k * step)] for k in range(n)]


def _context(lines: list[tuple[int, str]], i: int) -> str | None:
    """The CONTEXT_LINES lines before line i, from its paragraph, or None where there are fewer."""
    if i < CONTEXT_LINES or any(lines[j][0] != lines[i][0] for j in range(i - CONTEXT_LINES, i)):
        return None
    return "".join(lines[j][1] + "\n" for j in range(i - CONTEXT_LINES, i))


def next_line_items(pieces: list[str], n_items: int, seed: int = 0) -> list[dict]:
    """Up to n_items dicts {context, choices (4 lines), label (index of the true one), passage}."""
    lines = _lines(pieces)
    ok = [i for i, (_, ln) in enumerate(lines) if MIN_LINE <= len(ln.strip()) <= MAX_LINE]
    rng = random.Random(seed)
    items = []
    for i in _spread([i for i in ok if _context(lines, i) is not None], n_items):
        true = lines[i][1]
        n = len(true)
        pool = [j for j in ok if abs(j - i) >= MIN_DISTANCE and abs(len(lines[j][1]) - n) <= LENGTH_SLACK * n
                and lines[j][1].strip() != true.strip()]
        distractors = {lines[j][1] for j in pool}
        if len(distractors) < 3:
            continue
        choices = rng.sample(sorted(distractors), 3) + [true]
        rng.shuffle(choices)
        ctx = _context(lines, i)
        items.append({"context": ctx, "choices": choices, "label": choices.index(true), "passage": ctx + true})
    return items


def last_word_items(pieces: list[str], n_items: int, seed: int = 0) -> list[dict]:
    """Up to n_items dicts {context, target (" " + word), passage}: the passage's last line ends in a word of
    three or more letters (trailing punctuation dropped); `seed` is unused (kept for one builder signature)."""
    del seed
    lines = _lines(pieces)
    found = []
    for i in range(len(lines)):
        ctx = _context(lines, i)
        m = _LAST_WORD.match(lines[i][1])
        if ctx is not None and m:
            found.append({"context": ctx + m.group(1)[:-1], "target": " " + m.group(2),
                          "passage": ctx + m.group(1) + m.group(2)})
    return _spread(found, n_items)
