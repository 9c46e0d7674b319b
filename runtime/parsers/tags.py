"""Finding tags in text that arrives in pieces: the earliest complete tag, and how much of the tail might still
become one (that tail is held back until the next piece decides it)."""

from __future__ import annotations

from collections.abc import Sequence


def first_tag(text: str, tags: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(position, tag) of the tag that starts earliest in `text` at or after `start`, or None."""
    hits = [(i, tag) for tag in tags if (i := text.find(tag, start)) >= 0]
    return min(hits) if hits else None


def partial_tag_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags` (0 when none is)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best
