"""A client that goes away stops its request at once, streamed or not.

The handler's work is raced against the ASGI `http.disconnect` message (the pattern of vLLM's `with_cancellation`
and of Starlette's own StreamingResponse before ASGI 2.4); when the client wins, the work is cancelled, and the
`finally` that owns the engine request aborts it. `request.is_disconnected()` is not used: it only answers when
polled, and a request waiting for its first token polls nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse

T = TypeVar("T")


async def wait_for_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Callable[[], Awaitable[dict[str, Any]]], work: Awaitable[T]) -> T | None:
    """The result of `work`, or None when the client disconnected first (`work` is then cancelled). The request
    body must have been read already: this consumes what `receive` gives."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # no effect on the one that finished
        listener.cancel()
        await asyncio.wait((task, listener))
    return None if task.cancelled() else task.result()


class CancellableStream(StreamingResponse):
    """A StreamingResponse that always stops when its client disconnects (whatever ASGI version the server
    speaks) and always runs `on_close`, even when the stream never started."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await unless_disconnected(receive, self.stream_response(send))
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self._on_close()
