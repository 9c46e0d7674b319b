"""What guards every HTTP request before a handler sees it: the API key, the body size, and OpenAI-shaped errors.

The guards are plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would wrap streamed
responses and hide a client's disconnect from the handler (vLLM notes the same about `request.is_disconnected`).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request

from moerun.runtime.serve.errors import (OpenAIError, body_too_large, method_not_allowed, not_found, unauthorized,
                                         validation_error)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
DEFAULT_MAX_BODY_BYTES = 16 << 20  # 16 MiB: a 128k-token prompt as JSON token ids is well under it


async def send_error(send: Callable, error: OpenAIError) -> None:
    await JSONResponse(error.body(), status_code=error.status)({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class APIKeyGuard:
    """Every HTTP request must carry `Authorization: Bearer <key>`, except on `open_paths` (a health probe has
    no key). The comparison takes the same time wherever the strings differ."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = ("/health",)):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open = frozenset(open_paths)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in self._open:
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                await send_error(send, unauthorized())
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """A request body over `max_bytes` is answered with 413: at once when Content-Length says so, else as soon as
    the bytes read pass the limit (a chunked upload has no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await send_error(send, body_too_large(self.max_bytes))
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except OpenAIError as error:  # raised by limited_receive where no error handler turned it into a response
            if started or error.status != 413:
                raise
            await send_error(send, error)


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route can end in, answered as OpenAI's error JSON."""

    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return await openai_error(request, validation_error(error))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            mapped = not_found(request.url.path)
        elif error.status_code == 405:
            mapped = method_not_allowed(request.method, request.url.path)
        else:
            mapped = OpenAIError(error.status_code, str(error.detail), type="server_error" if error.status_code >= 500
                                 else "invalid_request_error")
        return await openai_error(request, mapped)

    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return await openai_error(request, OpenAIError(500, "Internal server error.", type="server_error"))

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
