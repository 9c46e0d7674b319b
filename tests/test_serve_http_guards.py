"""The error JSON, API key and body-size guards over a live loopback server, seen through the real `openai`
client: each failure arrives as the exception class and fields OpenAI's own API would give."""

from __future__ import annotations

import httpx2
import openai
import pytest
from fastapi import FastAPI, Request

from live_server import serve_in_thread
from moerun.runtime.parsers import parse_chat_output
from moerun.runtime.serve import responses
from moerun.runtime.serve.http_guards import APIKeyGuard, BodySizeLimit, install_error_handlers
from moerun.runtime.serve.protocol import ChatCompletionRequest, parse_request
from moerun.runtime.serve.sampling_params import sampling_kwargs

KEY = "sk-test-key"
LIMIT = 4096
CONTEXT = 64


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_request(ChatCompletionRequest, await request.body())
        prompt_tokens = sum(len(str(m.content).split()) for m in body.messages)  # a stand-in for the tokenizer
        sampling_kwargs(body, prompt_tokens, CONTEXT)
        return responses.chat_completion(responses.chat_completion_id(), "m", parse_chat_output("</think>ok"),
                                         "stop", responses.usage(prompt_tokens, 1))

    @app.post("/v1/crash")
    async def crash():
        raise RuntimeError("a bug")

    app.add_middleware(BodySizeLimit, max_bytes=LIMIT)
    app.add_middleware(APIKeyGuard, api_key=KEY)
    return app


@pytest.fixture(scope="module")
def base_url():
    with serve_in_thread(make_app()) as url:
        yield url


def client(base_url, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def ask(c: openai.OpenAI, text="hello", **kw):
    return c.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], **kw)


def test_a_valid_request_passes_every_guard(base_url):
    assert ask(client(base_url)).choices[0].message.content == "ok"


@pytest.mark.parametrize("key", ["sk-wrong", KEY + "x", KEY[:-1]])
def test_a_wrong_key_is_401(base_url, key):
    with pytest.raises(openai.AuthenticationError) as info:
        ask(client(base_url, key=key))
    assert info.value.code == "invalid_api_key"


def test_no_key_at_all_is_401_and_health_is_open(base_url):
    response = httpx2.post(f"{base_url}/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(f"{base_url}/health").status_code == 200


def test_a_bad_parameter_is_400_naming_it(base_url):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client(base_url), temperature=-1)
    assert info.value.param == "temperature" and info.value.type == "invalid_request_error"


def test_over_the_context_is_400_in_vllm_words(base_url):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client(base_url), text="word " * 60, max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert "This model's maximum context length is 64 tokens. However, you requested 70 tokens" in info.value.message


def test_unknown_routes_and_methods_are_openai_errors(base_url):
    with pytest.raises(openai.NotFoundError):
        client(base_url).models.retrieve("anything")
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx2.get(f"{base_url}/v1/chat/completions", headers=headers)
    assert response.status_code == 405 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_over_the_limit_is_413(base_url):
    with pytest.raises(openai.APIStatusError) as info:
        ask(client(base_url), text="x" * (LIMIT + 1))
    assert info.value.status_code == 413 and info.value.code == "request_too_large"


def test_a_chunked_body_over_the_limit_is_413(base_url):
    # No Content-Length: the guard counts the bytes as they are read.
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 512 + 1):
            yield b"y" * 512
        yield b'"}]}'

    response = httpx2.post(f"{base_url}/v1/chat/completions", content=chunks(),
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_bug_is_a_500_in_openai_shape(base_url):
    response = httpx2.post(f"{base_url}/v1/crash", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
