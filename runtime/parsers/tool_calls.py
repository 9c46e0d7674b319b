"""MiniMax-M2 tool calls, parsed incrementally from the text after the reasoning.

The model writes calls as XML after its answer text (minimax_m2.md 4.3); several invokes in one block are
parallel calls, and several blocks may follow each other:

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    <invoke name="get_time">
    </invoke>
    </minimax:tool_call>

What the parser promises (docs/serving.md has the long form):
- content is the text before the first `<minimax:tool_call>`; text between and after blocks is dropped;
- every `<invoke>` whose name is complete becomes one call, in order, with an id `call_` + 24 hex. The name is
  what the model wrote (quotes stripped) even when it is not in the request's tools: the client gets a call it
  can answer with an error, instead of XML in its content, and the conversation re-renders as the model wrote it;
- arguments are the JSON object of the complete parameters in the order written, each value typed by the
  tool's schema (values.py); a parameter written twice keeps its first value; no parameters gives "{}";
- an invoke ends at `</invoke>`, or where the block ends, the next invoke starts, or the output ends (a cut-off
  output keeps the parameters completed before the cut); a parameter ends at `</parameter>` or at the closing
  tag of its invoke or block;
- streamed: a call's id and name go out once, as soon as `<invoke name="...">` is complete, then one arguments
  fragment per completed parameter and the closing brace; a tag split across pieces is never sent as text.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moerun.runtime.parsers.tags import first_tag, partial_tag_len
from moerun.runtime.parsers.values import typed_value, unframe

BLOCK_START, BLOCK_END = "<minimax:tool_call>", "</minimax:tool_call>"
INVOKE_START, INVOKE_END = "<invoke name=", "</invoke>"
PARAMETER_START, PARAMETER_END = "<parameter name=", "</parameter>"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ToolCallDelta:
    """One piece of call `index`: its id and name come in the first piece only; arguments concatenate."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI's tool_calls[].function.arguments


def parameter_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """tool name -> {parameter name: JSON schema}, from OpenAI-style tool dicts."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
            schemas.setdefault(function["name"], dict(properties) if isinstance(properties, Mapping) else {})
    return schemas


class _State(enum.Enum):
    TEXT = "text"  # answer text, or the gap after a block
    BLOCK = "block"  # inside <minimax:tool_call>, between invokes
    INVOKE_NAME = "invoke name"  # after `<invoke name=`, before `>`
    INVOKE_BODY = "invoke body"  # between parameters
    PARAMETER_NAME = "parameter name"
    PARAMETER_VALUE = "parameter value"


# What ends each state (the earliest one found wins).
_ENDS = {
    _State.TEXT: (BLOCK_START,),
    _State.BLOCK: (INVOKE_START, BLOCK_END),
    _State.INVOKE_NAME: (">",),
    _State.INVOKE_BODY: (PARAMETER_START, INVOKE_END, INVOKE_START, BLOCK_END),
    _State.PARAMETER_NAME: (">",),
    _State.PARAMETER_VALUE: (PARAMETER_END, INVOKE_END, BLOCK_END),
}


class ToolCallStream:
    """Feed text pieces; each feed returns (content text, tool-call deltas) that are safe to send now."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None, new_id: Callable[[], str] = new_tool_call_id):
        self._schemas = parameter_schemas(tools)
        self._new_id = new_id
        self._state = _State.TEXT
        self._buffer = ""
        self._searched = 0  # the buffer before this offset holds no complete tag (a long value is not rescanned)
        self._seen_block = False
        self._calls = 0  # calls opened so far; the open one is index self._calls - 1
        self._tool = ""  # name of the open call
        self._parameter_name = ""
        self._arguments: dict[str, Any] = {}

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """`final`: the output ends with this piece; held text is flushed and an open call closed."""
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            ends = _ENDS[self._state]
            hit = first_tag(self._buffer, ends, self._searched)
            if hit is None:
                self._searched = max(0, len(self._buffer) - max(map(len, ends)) + 1)
                break
            at, tag = hit
            before, self._buffer, self._searched = self._buffer[:at], self._buffer[at + len(tag):], 0
            self._on_tag(before, tag, content, deltas)
        if self._state is _State.TEXT:
            keep = 0 if final else partial_tag_len(self._buffer, _ENDS[_State.TEXT])
            if not self._seen_block:
                content.append(self._buffer[:len(self._buffer) - keep])
            self._buffer, self._searched = self._buffer[len(self._buffer) - keep:], 0
        elif self._state is _State.BLOCK:  # nothing in a block between invokes is kept
            keep = partial_tag_len(self._buffer, _ENDS[_State.BLOCK])
            self._buffer, self._searched = self._buffer[len(self._buffer) - keep:], 0
        if final:
            if self._state in (_State.INVOKE_BODY, _State.PARAMETER_NAME, _State.PARAMETER_VALUE):
                deltas.append(self._close_call())  # a cut-off parameter is dropped: its value may be incomplete
            self._state, self._buffer, self._searched = _State.TEXT, "", 0
        return "".join(content), _merge(deltas)

    def _on_tag(self, before: str, tag: str, content: list[str], deltas: list[ToolCallDelta]) -> None:
        state = self._state
        if state is _State.TEXT:
            if not self._seen_block:
                content.append(before)
            self._seen_block = True
            self._state = _State.BLOCK
        elif state is _State.BLOCK:
            self._state = _State.INVOKE_NAME if tag == INVOKE_START else _State.TEXT
        elif state is _State.INVOKE_NAME:
            deltas.append(self._open_call(_unquote(before)))
            self._state = _State.INVOKE_BODY
        elif state is _State.PARAMETER_NAME:
            self._parameter_name = _unquote(before)
            self._state = _State.PARAMETER_VALUE
        else:  # INVOKE_BODY or PARAMETER_VALUE
            if state is _State.PARAMETER_VALUE:
                deltas.append(self._add_parameter(unframe(before)))
                if tag == PARAMETER_END:
                    self._state = _State.INVOKE_BODY
                    return
            if tag == PARAMETER_START:
                self._state = _State.PARAMETER_NAME
                return
            deltas.append(self._close_call())
            self._state = {INVOKE_END: _State.BLOCK, INVOKE_START: _State.INVOKE_NAME, BLOCK_END: _State.TEXT}[tag]

    def _open_call(self, name: str) -> ToolCallDelta:
        self._calls += 1
        self._tool = name
        self._arguments = {}
        return ToolCallDelta(self._calls - 1, id=self._new_id(), name=name)

    def _add_parameter(self, raw: str) -> ToolCallDelta:
        name, index = self._parameter_name, self._calls - 1
        if name in self._arguments:
            return ToolCallDelta(index)
        value = typed_value(raw, self._schemas.get(self._tool, {}).get(name))
        self._arguments[name] = value
        pair = json.dumps({name: value}, ensure_ascii=False)[1:-1]
        return ToolCallDelta(index, arguments=("{" if len(self._arguments) == 1 else ", ") + pair)

    def _close_call(self) -> ToolCallDelta:
        return ToolCallDelta(self._calls - 1, arguments="}" if self._arguments else "{}")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive pieces of one call become one delta, and pieces that carry nothing are dropped."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if merged and merged[-1].index == delta.index:
            merged[-1].arguments += delta.arguments
        elif delta.id is not None or delta.arguments:
            merged.append(dataclasses.replace(delta))
    return merged
