"""Each token's text and raw bytes, for OpenAI's logprobs: the engine reports token ids.

A byte-level BPE token can be part of a multi-byte character; its text alone is then U+FFFD, and OpenAI's `bytes`
field carries what it really is. The raw bytes come from the token's byte-level spelling (GPT-2's byte-to-unicode
alphabet); an added token (`<think>`) or a tokenizer of another kind is its decoded text, encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from moerun.runtime.serve.responses import TokenLogprob


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible map of the 256 byte values to printable characters, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_UNICODE_TO_BYTE = _byte_alphabet()


class TokenTexts:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cached = lru_cache(maxsize=1 << 16)(self._compute)

    def text_and_bytes(self, token_id: int) -> tuple[str, tuple[int, ...] | None]:
        """(the token's text, its raw bytes when the text is not them: a fragment of a character)."""
        return self._cached(token_id)

    def _compute(self, token_id: int) -> tuple[str, tuple[int, ...] | None]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, None
        spelling = self._tokenizer.id_to_token(token_id) or ""
        if spelling and all(c in _UNICODE_TO_BYTE for c in spelling):
            return text, tuple(_UNICODE_TO_BYTE[c] for c in spelling)
        return text, None

    def entry(self, token_id: int, logprob: float | None, top: Sequence[tuple[int, float]] = (),
              as_ids: bool = False) -> TokenLogprob:
        """`as_ids`: the token is named "token_id:N" (vLLM's return_tokens_as_token_ids), its bytes its text's."""
        text, raw = (f"token_id:{token_id}", None) if as_ids else self.text_and_bytes(token_id)
        return TokenLogprob(text, logprob, raw, tuple(self.entry(t, lp, as_ids=as_ids) for t, lp in top))

    def entries(self, engine_entries: Sequence[Any], as_ids: bool = False) -> list[TokenLogprob]:
        """The engine's LogprobEntry list (token_id, logprob, top) as response entries."""
        return [self.entry(e.token_id, e.logprob, e.top, as_ids) for e in engine_entries]
