"""A chat completion's output text -> reasoning, answer and tool calls, streamed or at once.

Reasoning modes:
- "split": reasoning goes to `reasoning_content`, the answer to `content` (vLLM/SGLang `minimax_m2` / `minimax`);
  the newlines that frame the tags are dropped, so the chat template re-renders the turn as the model wrote it;
- "append_think": everything stays in `content`, with `<think>` put back in front (vLLM `minimax_m2_append_think`),
  for clients that send the reasoning back inside the content;
- "off": no reasoning handling; the output is content.
Tool calls (when the request offers tools) are looked for only after the reasoning.

Not streaming is streaming in one piece: `parse_chat_output` feeds the whole text, so both paths give one result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from moerun.runtime.parsers.reasoning import THINK_END, THINK_START, EdgeNewlines, Piece, ReasoningSplitter
from moerun.runtime.parsers.tool_calls import ToolCall, ToolCallDelta, ToolCallStream, new_tool_call_id

ReasoningMode = Literal["split", "append_think", "off"]
REASONING_MODES: tuple[str, ...] = ("split", "append_think", "off")


@dataclasses.dataclass
class ChatDelta:
    """What one feed adds to the message: text for `content` and `reasoning_content`, and tool-call pieces."""
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclasses.dataclass(frozen=True)
class ParsedMessage:
    """The assistant message: None where a field is empty (as vLLM returns it)."""
    content: str | None
    reasoning_content: str | None
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_deltas(cls, deltas: Iterable[ChatDelta]) -> "ParsedMessage":
        content, reasoning = [], []
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        for delta in deltas:
            content.append(delta.content)
            reasoning.append(delta.reasoning)
            for piece in delta.tool_calls:
                call = calls.setdefault(piece.index, ["", "", ""])
                call[0] = call[0] or piece.id or ""
                call[1] = call[1] or piece.name or ""
                call[2] += piece.arguments
        tool_calls = tuple(ToolCall(*calls[i]) for i in sorted(calls))
        return cls("".join(content) or None, "".join(reasoning) or None, tool_calls)


class ChatOutputParser:
    """Feed the decoded text as it grows (any chunking); `finish()` once at the end. Each returns a ChatDelta of
    what is safe to send: a tag split across feeds is held back until it is complete or proven not to be one."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, reasoning: ReasoningMode = "split",
                 starts_in_reasoning: bool = True, new_id: Callable[[], str] = new_tool_call_id):
        if reasoning not in REASONING_MODES:
            raise ValueError(f"reasoning mode {reasoning!r}: expected one of {', '.join(REASONING_MODES)}")
        self._mode = reasoning
        self._splitter = None if reasoning == "off" else ReasoningSplitter(starts_in_reasoning)
        self._tools = None if tools is None else ToolCallStream(tools, new_id)
        trim = reasoning == "split"
        self._reasoning_edges = EdgeNewlines() if trim else None
        self._content_edges = EdgeNewlines() if trim else None

    def feed(self, text: str) -> ChatDelta:
        return self._push(text, final=False)

    def finish(self) -> ChatDelta:
        return self._push("", final=True)

    def _push(self, text: str, final: bool) -> ChatDelta:
        pieces = self._splitter.feed(text, final) if self._splitter else [(Piece.CONTENT, text)]
        delta = ChatDelta()
        answer = []
        for kind, piece in pieces:
            if kind is Piece.CONTENT:
                answer.append(piece)
            elif self._mode == "append_think":  # the reasoning and its tags stay in the content, as written
                delta.content += {Piece.START: THINK_START, Piece.END: THINK_END}.get(kind, piece)
            elif kind is Piece.REASONING:
                delta.reasoning += self._reasoning_edges.push(piece)
        text = "".join(answer)
        if self._tools is not None:
            text, delta.tool_calls = self._tools.feed(text, final)
        delta.content += self._content_edges.push(text) if self._content_edges else text
        return delta


def parse_chat_output(text: str, tools: Sequence[Mapping[str, Any]] | None = None, reasoning: ReasoningMode = "split",
                      starts_in_reasoning: bool = True,
                      new_id: Callable[[], str] = new_tool_call_id) -> ParsedMessage:
    """The whole output at once (a non-streamed response)."""
    parser = ChatOutputParser(tools, reasoning, starts_in_reasoning, new_id)
    return ParsedMessage.from_deltas([parser.feed(text), parser.finish()])
