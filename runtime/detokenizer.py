"""Token ids -> text, one step at a time, as the full decode of all ids would give it.

Byte-level BPE splits a multi-byte UTF-8 character (CJK, emoji) over several tokens; decoding them one by one
would print U+FFFD for each fragment. So text is decoded over a short window of ids: the part after the ids
already reported is emitted only once it no longer ends in an incomplete character. The window starts on a
token boundary where earlier text was complete, so its decode is the same text the full decode has there.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
# Prompt ids decoded ahead of the first output token: context for decoders whose output depends on the
# previous token (a leading space, the continuation of a character the prompt left open).
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # window start: ids before it are reported
        self.read = len(self.ids)  # ids before it are reported as text

    def add(self, token_ids: list[int]) -> str:
        """Append ids; return the text they complete (possibly "")."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a request: whatever is left, incomplete characters included (as the full decode has them)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip_special_tokens)
        text = decode(self.ids[self.prefix:], skip_special_tokens=self.skip_special_tokens)
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
