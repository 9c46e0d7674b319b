"""A scripted OpenAI-compatible server for tests of clients (the load generator): it streams a known number of
tokens per request, fails the requests it is told to, and records what it received and what it sent."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moerun.runtime.parsers import ChatDelta, ParsedMessage
from moerun.runtime.serve import responses

MODEL = "fake-model"


@dataclasses.dataclass
class Script:
    fail_every: int = 0  # requests number k, 2k, ... (counted from 1) are answered with a 500
    usage: bool = True  # honour stream_options.include_usage
    tokens_per_chunk: int = 1
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0

    def output_tokens(self, body: dict) -> int:
        # With ignore_eos the request gets what it asked for; without, the "model" stops early.
        return body["max_tokens"] if body.get("ignore_eos") else max(1, body["max_tokens"] // 2)


@dataclasses.dataclass
class Record:
    number: int
    body: dict
    in_flight_at_start: int
    failed: bool = False
    tokens: int = 0
    chunks: int = 0
    prompt_tokens: int = 0


class FakeOpenAI:
    def __init__(self, script: Script):
        self.script = script
        self.records: list[Record] = []
        self._numbers = itertools.count(1)
        self._in_flight = 0
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/completions")(self.completions)

    async def models(self):
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

    async def chat(self, request: Request):
        return await self._answer(await request.json(), chat=True)

    async def completions(self, request: Request):
        return await self._answer(await request.json(), chat=False)

    async def _answer(self, body: dict, chat: bool):
        self._in_flight += 1
        record = Record(next(self._numbers), body, self._in_flight)
        self.records.append(record)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        record.prompt_tokens = len(prompt.split())
        if self.script.fail_every and record.number % self.script.fail_every == 0:
            record.failed = True
            self._in_flight -= 1
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error", "param": None,
                                           "code": None}}, status_code=500)
        record.tokens = self.script.output_tokens(body)
        usage = responses.usage(record.prompt_tokens, record.tokens)
        if not body.get("stream"):
            self._in_flight -= 1
            text = "tok " * record.tokens
            if chat:
                message = ParsedMessage(text, None)
                return responses.chat_completion("chatcmpl-x", MODEL, message, "length", usage)
            return responses.completion("cmpl-x", MODEL, text, "length", usage)
        include_usage = self.script.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(self._stream(record, chat, include_usage, usage), media_type="text/event-stream")

    async def _stream(self, record: Record, chat: bool, include_usage: bool, usage: dict):
        builder = (responses.ChatChunks if chat else responses.CompletionChunks)(MODEL, include_usage=include_usage)
        try:
            if chat:
                yield responses.sse_event(builder.role())
            await asyncio.sleep(self.script.first_token_delay_s)
            sent = 0
            while sent < record.tokens:
                n = min(self.script.tokens_per_chunk, record.tokens - sent)
                text = "tok " * n
                chunk = builder.delta(ChatDelta(content=text)) if chat else builder.text(text)
                yield responses.sse_event(chunk)
                record.chunks += 1
                sent += n
                await asyncio.sleep(self.script.token_delay_s)
            yield responses.sse_event(builder.finish("length"))
            if include_usage:
                yield responses.sse_event(builder.usage(usage))
            yield responses.SSE_DONE
        finally:
            self._in_flight -= 1

