"""Where MiniMax-M2's reasoning ends: the text before `</think>` is reasoning, the text after it the answer.

M2's generation prompt ends with `<think>\\n`, so the output normally starts inside the reasoning and shows only
`</think>`; M2.5 and later may write `<think>` again first, which is dropped. Only the first `</think>` counts;
later think tags are text. Without `</think>` the whole output is reasoning (cut off while thinking).
"""

from __future__ import annotations

import enum

from moerun.runtime.parsers.tags import partial_tag_len

THINK_START, THINK_END = "<think>", "</think>"


class Piece(enum.Enum):
    START = "start"  # a reasoning segment begins (no text)
    REASONING = "reasoning"
    END = "end"  # `</think>` (no text)
    CONTENT = "content"


class _State(enum.Enum):
    START = "start"
    REASONING = "reasoning"
    CONTENT = "content"


class ReasoningSplitter:
    """Feed text pieces; each feed returns the (Piece, text) items that are safe to pass on now."""

    def __init__(self, starts_in_reasoning: bool = True):
        self._starts_in_reasoning = starts_in_reasoning
        self._state = _State.START
        self._buffer = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[Piece, str]]:
        """`final`: the output ends with this piece, so nothing is held back."""
        self._buffer += text
        out: list[tuple[Piece, str]] = []
        if self._state is _State.START:
            if THINK_START.startswith(self._buffer) and len(self._buffer) < len(THINK_START) and not final:
                return out  # maybe the start of `<think>`
            opened = self._buffer.startswith(THINK_START)
            if opened:
                self._buffer = self._buffer[len(THINK_START):]
            if opened or self._starts_in_reasoning:
                self._state = _State.REASONING
                out.append((Piece.START, ""))
            else:
                self._state = _State.CONTENT
        if self._state is _State.REASONING:
            at = self._buffer.find(THINK_END)
            if at >= 0:
                out += [(Piece.REASONING, self._buffer[:at]), (Piece.END, "")]
                self._buffer = self._buffer[at + len(THINK_END):]
                self._state = _State.CONTENT
            else:
                keep = 0 if final else partial_tag_len(self._buffer, (THINK_END,))
                out.append((Piece.REASONING, self._buffer[:len(self._buffer) - keep]))
                self._buffer = self._buffer[len(self._buffer) - keep:]
        if self._state is _State.CONTENT:
            out.append((Piece.CONTENT, self._buffer))
            self._buffer = ""
        return [(kind, text) for kind, text in out if text or kind in (Piece.START, Piece.END)]


class EdgeNewlines:
    """Drops the newlines at both ends of a text stream that arrives in pieces: around the think and tool-call
    tags they are framing, which the chat template writes itself (`<think>\\n...\\n</think>\\n\\n`)."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip("\n")
        self._held = text[len(body):]
        return body
