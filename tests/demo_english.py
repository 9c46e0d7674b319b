"""What "English like the demo's corpus" means in tests: words drawn from the training corpus (tools/demo_corpus.py,
seed 0), and sentences that end."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_corpus  # noqa: E402  (tools/ is scripts, not a package)


def words(text: str | None) -> list[str]:
    return re.findall(r"[a-z]+", (text or "").lower())


@functools.cache
def corpus_vocabulary() -> frozenset[str]:
    return frozenset(words("".join(demo_corpus.render_conversations(0, max_chars=1_000_000))))


def known_share(text: str | None) -> float:
    """The share of the words in `text` that the corpus uses (0 when there are none)."""
    found = words(text)
    return sum(w in corpus_vocabulary() for w in found) / len(found) if found else 0.0


def is_sentence(text: str | None, min_words: int = 4) -> bool:
    """At least `min_words` words, nearly all of them corpus words, and a full stop, ! or ? at the end."""
    text = (text or "").strip()
    return len(words(text)) >= min_words and known_share(text) >= 0.9 and text[-1] in ".!?"
