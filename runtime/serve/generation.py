"""What both generation endpoints share: what the server knows about its model, and one request's run through the
engine (admission, its outputs as they come, its end in the metrics and in the engine)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from moerun.backends.errors import MoerunError
from moerun.runtime.parsers import ReasoningMode
from moerun.runtime.sampling_params import SamplingParams
from moerun.runtime.serve import responses
from moerun.runtime.serve.engine_loop import EngineDeadError, EngineLoop, RequestStream
from moerun.runtime.serve.errors import OpenAIError, engine_refused, server_error, too_many_requests
from moerun.runtime.serve.metrics import RequestMetrics, ServerMetrics
from moerun.runtime.serve.token_text import TokenTexts


@dataclasses.dataclass
class ServeState:
    """One server's model and engine, as the request handlers see them."""
    engine_loop: EngineLoop
    tokenizer: Any
    model_name: str
    max_model_len: int
    defaults: Mapping[str, Any]  # the checkpoint's sampling defaults (generation_config.json)
    metrics: ServerMetrics
    reasoning: ReasoningMode = "split"
    max_concurrent_requests: int = 0  # 0: no cap
    token_texts: TokenTexts = dataclasses.field(init=False)
    in_flight: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)

    async def start(self, endpoint: str, request_id: str, prompt_ids: list[int], sampling: Mapping[str, Any],
                    arrival: float) -> Generation:
        """Admit a request to the engine. OpenAIError 400 when the engine refuses it, 429 over the cap, 500 when
        the engine is dead."""
        if self.max_concurrent_requests and self.in_flight >= self.max_concurrent_requests:
            raise too_many_requests(self.max_concurrent_requests)
        self.in_flight += 1
        try:
            stream = await self.engine_loop.submit(request_id, prompt_ids, SamplingParams(**sampling))
        except BaseException as error:
            self.in_flight -= 1
            if isinstance(error, MoerunError):
                raise engine_refused(str(error)) from None
            if isinstance(error, EngineDeadError):
                raise engine_dead(error) from None
            raise
        metrics = self.metrics.request(endpoint, arrival)
        metrics.accepted(len(prompt_ids))
        return Generation(self, stream, metrics)


def usage_of(last: Any) -> dict[str, Any]:
    """The usage block, from a request's last output."""
    return responses.usage(last.num_prompt_tokens, len(last.output_token_ids), last.num_cached_tokens)


def engine_dead(error: EngineDeadError) -> OpenAIError:
    return server_error(f"The engine cannot serve requests: {error}", code="engine_dead")


class Generation:
    """One admitted request: iterate `outputs()`, then `close()` exactly once (a `finally`), which aborts the
    request in the engine if it has not finished (the client went away) and records how it ended."""

    def __init__(self, state: ServeState, stream: RequestStream, metrics: RequestMetrics):
        self._state = state
        self._stream = stream
        self._metrics = metrics
        self.finish_reason: str | None = None  # set by the handler from the last output (tool_calls, ...)
        self._failed = False
        self._closed = False

    async def outputs(self) -> AsyncIterator[list[Any]]:
        """The engine's outputs in pieces (whatever arrived since the last one), up to the finished one.
        Raises OpenAIError 500 when the engine dies."""
        while not self._stream.finished:
            try:
                deliveries = await self._stream.next()
            except EngineDeadError as dead:
                self._failed = True
                raise engine_dead(dead) from None
            self._metrics.delivered(deliveries)
            yield [d.output for d in deliveries]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.in_flight -= 1
        aborted = not self._stream.finished
        self._stream.close()
        reason = "error" if self._failed else "abort" if aborted else (self.finish_reason or "stop")
        self._metrics.ended(reason, time.monotonic())
