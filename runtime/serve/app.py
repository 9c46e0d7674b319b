"""The FastAPI app of `moerun serve`: its routes, and the guards around them.

Requests pass, outermost first: the response counter (metrics), the API-key guard (every path but /health), the
body-size cap, then the route. A generation route validates the whole request (body, template, context length)
before anything reaches the engine, and races its work against the client's disconnect, so a client that goes
away has its engine request aborted at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moerun.runtime.parsers import ReasoningMode
from moerun.runtime.serve.chat import ChatCompletion, render_prompt
from moerun.runtime.serve.completions import Completion
from moerun.runtime.serve.disconnect import CancellableStream, unless_disconnected
from moerun.runtime.serve.engine_loop import EngineLoop
from moerun.runtime.serve.errors import OpenAIError, bad_request, model_not_found
from moerun.runtime.serve.generation import ServeState
from moerun.runtime.serve.http_guards import DEFAULT_MAX_BODY_BYTES, APIKeyGuard, BodySizeLimit, install_error_handlers
from moerun.runtime.serve.metrics import CONTENT_TYPE, CountResponses, ServerMetrics
from moerun.runtime.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest, parse_request)

OPEN_PATHS = ("/health",)  # answered without the API key: a load balancer's probe has none
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away first; nobody receives it


@dataclasses.dataclass(frozen=True)
class AppOptions:
    served_model_name: str
    api_key: str | None = None
    reasoning: ReasoningMode = "split"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = 0  # generation requests in flight; 0: no cap (the engine queues them)


def create_app(engine: Any, options: AppOptions,
               keepalive_every_s: float | None = None) -> tuple[FastAPI, EngineLoop]:
    """The app serving `engine` (Engine's interface), and the loop that runs the engine: the app's lifespan
    starts and stops it. keepalive_every_s: see EngineLoop (several ranks)."""
    engine_loop = EngineLoop(engine, keepalive_every_s)
    metrics = ServerMetrics(engine_loop, ROUTES)
    state = ServeState(engine_loop, engine.tokenizer, options.served_model_name, engine.max_model_len,
                       dataclasses.asdict(engine.generation_defaults), metrics, options.reasoning,
                       options.max_concurrent_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine_loop.alive:
            engine_loop.start()
        yield
        engine_loop.stop()

    app = FastAPI(title="moerun", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(BodySizeLimit, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(APIKeyGuard, api_key=options.api_key, open_paths=OPEN_PATHS)
    app.add_middleware(CountResponses, metrics=metrics)
    return app, engine_loop


def _add_routes(app: FastAPI, state: ServeState) -> None:
    created = int(time.time())

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise model_not_found(name, state.model_name)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": created, "owned_by": "moerun",
                "max_model_len": state.max_model_len}

    @app.get("/health")
    async def health():
        if state.engine_loop.alive:
            return {"status": "ok"}
        why = state.engine_loop.dead or "not started"
        return JSONResponse(OpenAIError(503, f"The engine is not running: {why}", type="server_error",
                                        code="engine_dead").body(), status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatCompletionRequest, await request.body())
        check_model(body.model)
        return await _generate(request, ChatCompletion(state, body), body.stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await request.body())
        check_model(body.model)
        return await _generate(request, Completion(state, body), body.stream)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_request(TokenizeRequest, await request.body())
        check_model(body.model)
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            text = render_prompt(state.tokenizer, [m.for_template() for m in body.messages], tools,
                                 body.add_generation_prompt, dict(body.chat_template_kwargs or {}))
        else:
            text = body.prompt
        tokens = state.tokenizer.encode(text)
        return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_request(DetokenizeRequest, await request.body())
        check_model(body.model)
        vocab = state.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(body.tokens) if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"tokens.{bad}: {body.tokens[bad]} is outside the vocabulary (allowed: 0..{vocab - 1})",
                              param=f"tokens.{bad}")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}


async def _generate(request: Request, job: ChatCompletion | Completion, stream: bool) -> Response:
    """Admit the job and answer it; the engine request is closed (aborted if unfinished) however this ends."""
    if stream:
        generation = await job.start()  # a refusal is still an HTTP error: no header has been sent yet
        try:
            return CancellableStream(job.stream(generation), on_close=generation.close, media_type="text/event-stream")
        except BaseException:
            generation.close()
            raise

    async def whole() -> dict[str, Any]:
        generation = await job.start()
        try:
            return await job.respond(generation)
        finally:
            generation.close()

    result = await unless_disconnected(request.receive, whole())
    return Response(status_code=CLIENT_CLOSED) if result is None else JSONResponse(result)
