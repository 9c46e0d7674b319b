"""Response bodies and stream chunks of /v1/chat/completions and /v1/completions, in OpenAI's shapes.

Streams follow OpenAI: the first chat chunk carries the role, later chunks only what is new (a tool call's id and
name once, then arguments), the last choice chunk an empty delta and the finish reason; with
stream_options.include_usage every chunk has `"usage": null` and one more chunk follows with `"choices": []` and
the usage; then `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from moerun.runtime.parsers import ChatDelta, ParsedMessage, ToolCallDelta

SSE_DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM report this floor instead


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def finish_reason(engine_reason: str, called_tools: bool) -> str:
    """The engine's "stop" or "length"; a message that ends in tool calls reports "tool_calls", as OpenAI does."""
    return "tool_calls" if called_tools and engine_reason == "stop" else engine_reason


# ---- logprobs ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One position: the token chosen (or given, for prompt tokens), its logprob, and the top alternatives.
    logprob None: the first prompt token, which nothing predicts. `bytes`: the token's raw bytes when its text is
    not valid UTF-8 on its own (part of a multi-byte character); by default its text encoded."""
    token: str
    logprob: float | None
    bytes: tuple[int, ...] | None = None
    top: tuple["TokenLogprob", ...] = ()

    @property
    def raw_bytes(self) -> list[int]:
        return list(self.bytes) if self.bytes is not None else list(self.token.encode("utf-8"))


def _clamped(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(e: TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": _clamped(e.logprob), "bytes": e.raw_bytes}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries]}


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; `text_offset`: where the first token starts in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [None if e.logprob is None else _clamped(e.logprob) for e in entries],
            "top_logprobs": [None if e.logprob is None else {t.token: _clamped(t.logprob) for t in e.top}
                             for e in entries],
            "text_offset": offsets}


# ---- chat --------------------------------------------------------------------------------------------------------

def message_dict(message: ParsedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": message.content,
                           "reasoning_content": message.reasoning_content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    return out


def delta_dict(delta: ChatDelta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [_tool_call_delta(t) for t in delta.tool_calls]
    return out


def _tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": delta.index}
    function: dict[str, Any] = {"arguments": delta.arguments}
    if delta.id is not None:  # the first piece of a call: never a null name (SGLang #23071)
        out.update(id=delta.id, type="function")
        function = {"name": delta.name, **function}
    out["function"] = function
    return out


def chat_completion(request_id: str, model: str, message: ParsedMessage, finish: str, usage_: dict[str, Any],
                    logprobs: Sequence[TokenLogprob] | None = None, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message_dict(message),
                         "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                         "finish_reason": finish_reason(finish, bool(message.tool_calls))}],
            "usage": usage_}


class _Chunks:
    """What every chunk of one stream shares: id, created, model, and `"usage": null` when usage is asked for."""
    object_name = ""

    def __init__(self, model: str, include_usage: bool = False, request_id: str | None = None,
                 created: int | None = None):
        self.id = request_id or self.new_id()
        self.model = model
        self.created = created or int(time.time())
        self.include_usage = include_usage

    @staticmethod
    def new_id() -> str:
        raise NotImplementedError

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage_: dict[str, Any]) -> dict[str, Any]:
        """The chunk after the last choice chunk, sent when stream_options.include_usage is true."""
        return {**self._chunk([]), "usage": usage_}


class ChatChunks(_Chunks):
    """The chunks of one streamed chat completion, in order: role(), delta()..., finish(), then usage()."""
    object_name = "chat.completion.chunk"
    new_id = staticmethod(chat_completion_id)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.called_tools = False

    def _choice(self, delta: dict[str, Any], logprobs: Sequence[TokenLogprob] | None, finish: str | None):
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": chat_logprobs(logprobs) if logprobs else None}])

    def role(self) -> dict[str, Any]:
        return self._choice({"role": "assistant", "content": ""}, None, None)

    def delta(self, delta: ChatDelta, logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any] | None:
        """The chunk for what the parser released, or None when there is nothing to send."""
        if not delta and not logprobs:
            return None
        self.called_tools |= bool(delta.tool_calls)
        return self._choice(delta_dict(delta), logprobs, None)

    def finish(self, engine_reason: str, last: ChatDelta | None = None,
               logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
        """The last choice chunk; `last`: what the parser's finish() released, sent in the same chunk."""
        last = last or ChatDelta()
        self.called_tools |= bool(last.tool_calls)
        return self._choice(delta_dict(last), logprobs, finish_reason(engine_reason, self.called_tools))


# ---- completions -------------------------------------------------------------------------------------------------

def completion(request_id: str, model: str, text: str, finish: str, usage_: dict[str, Any],
               logprobs: dict[str, Any] | None = None, created: int | None = None) -> dict[str, Any]:
    """`logprobs`: from completion_logprobs (prompt and output entries together when echoing)."""
    return {"id": request_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}], "usage": usage_}


class CompletionChunks(_Chunks):
    """The chunks of one streamed completion: text()..., finish(), then usage()."""
    object_name = "text_completion"
    new_id = staticmethod(completion_id)

    def text(self, text: str, logprobs: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
        return self._chunk([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def finish(self, engine_reason: str, text: str = "", logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.text(text, logprobs, engine_reason)
