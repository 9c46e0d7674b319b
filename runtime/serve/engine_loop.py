"""The engine's own thread, and the asyncio side that talks to it.

The engine is not thread-safe, so one thread owns it: it takes new requests and aborts from an inbox (a plain
thread-safe queue), runs `engine.step()` while anything is unfinished, and hands each step's outputs to the event
loop in one `call_soon_threadsafe`, where they land in per-request asyncio queues. Nothing on the event loop
touches engine state; what it needs to know (running, waiting, KV blocks) it reads from the snapshot of
`engine.stats()` the thread publishes after every step.

Under torchrun the other ranks wait for each step with a timeout (parallel.init_timeout_s): an idle engine thread
calls `engine.keepalive()` every keepalive_every_s so that an idle server is not mistaken for a dead one.

An exception in the engine thread kills the engine for good: `dead` is set, every request in flight (and every
one still in the inbox) gets EngineDeadError, later submissions are refused at once, and the failure is logged
in one line. The server stays up and answers `/health` with 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from moerun.backends.errors import MoerunError

log = logging.getLogger("moerun.serve")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (a crash, or the server shutting down); no request can be served."""


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One engine output for one request, stamped when the engine thread handed it over (time.monotonic)."""
    at: float
    output: Any  # the engine's RequestOutput


class RequestStream:
    """The event-loop end of one request: the engine's outputs in order, then the end of the request."""

    def __init__(self, request_id: str, loop: EngineLoop, event_loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._engine_loop = loop
        self._event_loop = event_loop
        self._queue: asyncio.Queue[Delivery | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = event_loop.create_future()
        self.finished = False

    async def next(self) -> list[Delivery]:
        """The next outputs: waits for one, then takes every other one already queued (a slow reader gets
        them in one piece instead of falling behind). Raises EngineDeadError when the engine died."""
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        deliveries = []
        for item in items:
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            deliveries.append(item)
        self.finished = deliveries[-1].output.finished
        return deliveries

    def close(self) -> None:
        """Done reading (the response ended, failed, or its client went away): an unfinished request is aborted,
        which frees its KV blocks at the engine's next iteration."""
        if not self.finished:
            self.finished = True
            self._engine_loop.abort(self.request_id)

    # Called on the event loop, by the engine thread through call_soon_threadsafe.
    def _put(self, item: Delivery | BaseException) -> None:
        self._queue.put_nowait(item)

    def _settle(self, error: BaseException | None) -> None:
        if not self.accepted.done():
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)


@dataclasses.dataclass(frozen=True)
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: Any


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclasses.dataclass(frozen=True)
class _Call:
    fn: Callable[[Any], Any]
    future: concurrent.futures.Future


class _Stop:
    pass


class EngineLoop:
    def __init__(self, engine: Any, keepalive_every_s: float | None = None):
        self._engine = engine
        self._keepalive_every_s = keepalive_every_s
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._lock = threading.Lock()  # orders "is it dead?" against submissions
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self.stats = engine.stats()  # replaced (never mutated) after every step
        self.num_aborted = 0  # requests aborted in the engine (their client went away)

    # ---- the event-loop side -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moerun-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: Any) -> RequestStream:
        """Queue a request; returns once the engine has accepted it. Raises the engine's MoerunError for a
        request it refuses, EngineDeadError when it cannot serve at all."""
        stream = RequestStream(request_id, self, asyncio.get_running_loop())
        self._send(_Add(stream, list(prompt_token_ids), params))
        try:
            await stream.accepted
        except asyncio.CancelledError:  # the client left while the request was queued: drop it from the engine
            stream.close()
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if self.dead is None:
            self._inbox.put(_Abort(request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between steps (nothing else touches the engine meanwhile)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_Call(fn, future))
        return future

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the engine thread after its current step; requests still in flight get EngineDeadError."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout_s)

    def _send(self, message: _Add | _Call) -> None:
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"the engine is not running ({self.dead})")
            self._inbox.put(message)

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take_inbox(wait=not self._engine.has_unfinished_requests()):
                self.stats = self._engine.stats()
                if self._engine.has_unfinished_requests():
                    self._deliver(self._engine.step())
                    self.stats = self._engine.stats()
            self._die(EngineDeadError("the server is shutting down"))
        except BaseException as error:  # noqa: BLE001 - whatever it was, the engine cannot go on
            log.error("engine loop died: %s: %s", type(error).__name__, error)
            self._die(EngineDeadError(f"the engine failed: {type(error).__name__}: {error}"))

    def _take_inbox(self, wait: bool) -> bool:
        """Apply every queued message (waiting for the first one when the engine is idle); False on stop."""
        while True:
            try:
                message = self._inbox.get(block=wait, timeout=self._keepalive_every_s if wait else None)
            except queue.Empty:
                if not wait:
                    return True
                self._engine.keepalive()  # idle for keepalive_every_s: the other ranks hear from rank 0
                continue
            wait = False
            if isinstance(message, _Stop):
                return False
            if isinstance(message, _Add):
                self._add(message)
            elif isinstance(message, _Abort):
                if self._streams.pop(message.request_id, None) is not None:
                    self._engine.abort_request(message.request_id)
                    self.num_aborted += 1
            else:
                self._call(message)

    def _add(self, message: _Add) -> None:
        stream = message.stream
        try:
            self._engine.add_request(stream.request_id, message.prompt_token_ids, message.params)
        except MoerunError as refused:  # a bad request, not a broken engine
            stream._event_loop.call_soon_threadsafe(stream._settle, refused)
            return
        self._streams[stream.request_id] = stream
        stream._event_loop.call_soon_threadsafe(stream._settle, None)

    def _call(self, message: _Call) -> None:
        try:
            message.future.set_result(message.fn(self._engine))
        except Exception as error:  # the caller's problem, raised where it waits
            message.future.set_exception(error)

    def _deliver(self, outputs: list[Any]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delivery]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted meanwhile, or not a server request
                continue
            if output.finished:
                del self._streams[output.request_id]
            by_loop.setdefault(stream._event_loop, []).append((stream, Delivery(now, output)))
        for event_loop, batch in by_loop.items():
            event_loop.call_soon_threadsafe(_put_all, batch)

    def _die(self, error: EngineDeadError) -> None:
        with self._lock:
            self.dead = error
        pending = list(self._streams.values())
        self._streams.clear()
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, _Add):
                pending.append(message.stream)
            elif isinstance(message, _Call):
                message.future.set_exception(error)
        for stream in pending:
            try:
                stream._event_loop.call_soon_threadsafe(_fail, stream, error)
            except RuntimeError:  # its event loop is already closed: nobody waits for it
                pass


def _put_all(batch: list[tuple[RequestStream, Delivery]]) -> None:
    for stream, delivery in batch:
        stream._put(delivery)


def _fail(stream: RequestStream, error: BaseException) -> None:
    stream._settle(error)
    stream._put(error)
