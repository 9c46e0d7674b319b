"""`moerun serve`'s app over a live loopback socket, seen through the real `openai` client, with the engine
replaced by a script (tests/scripted_engine.py): known model output runs the whole server path (engine thread,
detokenized pieces, parsers, chunks, errors, metrics, disconnects). test_serve_engine.py runs the real engine."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import serve_in_thread, wait_until
from moerun.runtime.demo import ensure_demo_checkpoint
from moerun.runtime.serve.app import AppOptions, create_app
from moerun.runtime.tokenizer import Tokenizer
from scripted_engine import SCRIPTED_LOGPROB, ScriptedEngine

MODEL = "scripted-m2"
KEY = "sk-serve-test"
MAX_MODEL_LEN = 1024
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOL_OUTPUT = ('Paris, three days.\n</think>\n\nChecking.<minimax:tool_call>\n<invoke name="get_weather">\n'
               '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'
               '</minimax:tool_call>')
ANSWER_OUTPUT = "Two plus two.\n</think>\n\nIt is 4 — vier, 四."
LONG_OUTPUT = " ".join(["word"] * 400)


def script(prompt: str) -> str:
    """The "model": a tool call when asked about the weather, a long ramble when asked to, else an answer."""
    if "weather" in prompt:
        return TOOL_OUTPUT
    return LONG_OUTPUT if "ramble" in prompt else ANSWER_OUTPUT


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_folder(ensure_demo_checkpoint())


@contextlib.contextmanager
def scripted_server(tokenizer, step_delay_s: float = 0.0, fail_at_step: int | None = None, **options):
    engine = ScriptedEngine(tokenizer, script, max_model_len=MAX_MODEL_LEN, step_delay_s=step_delay_s,
                            fail_at_step=fail_at_step)
    app, engine_loop = create_app(engine, AppOptions(MODEL, **options))
    with serve_in_thread(app, lifespan="on") as url:
        yield url, engine, engine_loop


@pytest.fixture(scope="module")
def server(tokenizer):
    with scripted_server(tokenizer, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def ask(client, text, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def accumulate(chunks):
    """A streamed chat completion put together: (content, reasoning, {index: [id, name, arguments]}, finish,
    usage chunk, the chunks)."""
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    chunks = list(chunks)
    for chunk in chunks:
        if not chunk.choices:
            usage = chunk
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, ["", "", ""])
            entry[0] += call.id or ""
            entry[1] += call.function.name or ""
            entry[2] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, reasoning, calls, finish, usage, chunks


# ---- chat: reasoning, tools, streaming --------------------------------------------------------------------------

def test_a_tool_call_with_reasoning_streamed_and_not(client, tokenizer):
    whole = ask(client, "What is the weather in Paris?", tools=TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.model_extra["reasoning_content"] == "Paris, three days."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert call.id.startswith("call_") and len(call.id) == len("call_") + 24
    assert whole.usage.completion_tokens == len(tokenizer.encode(TOOL_OUTPUT))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}], TOOLS)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))

    stream = ask(client, "What is the weather in Paris?", tools=TOOLS, stream=True,
                 stream_options={"include_usage": True})
    content, reasoning, calls, finish, usage, chunks = accumulate(stream)
    assert (content, reasoning, finish) == ("Checking.", "Paris, three days.", "tool_calls")
    assert [(name, json.loads(args)) for _, name, args in calls.values()] == [("get_weather", {"city": "Paris", "days": 3})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1] is usage
    assert usage.choices == [] and usage.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == \
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})


def test_tool_choice_none_leaves_the_output_as_text(client):
    message = ask(client, "What is the weather in Paris?", tools=TOOLS, tool_choice="none").choices[0].message
    assert message.tool_calls is None and message.content.startswith("Checking.<minimax:tool_call>")


def test_append_think_keeps_the_reasoning_in_the_content(tokenizer):
    with scripted_server(tokenizer, reasoning="append_think") as (url, _, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        message = ask(c, "What is 2 + 2?").choices[0].message
    assert message.content == "<think>" + ANSWER_OUTPUT
    assert message.model_extra.get("reasoning_content") is None


def test_unicode_answer_and_logprobs(client):
    whole = ask(client, "What is 2 + 2?", logprobs=True, top_logprobs=2, temperature=0, seed=-5, stop=["never"],
                max_completion_tokens=200)
    message = whole.choices[0].message
    assert (message.content, message.model_extra["reasoning_content"]) == ("It is 4 — vier, 四.", "Two plus two.")
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert all(e.logprob == SCRIPTED_LOGPROB and len(e.top_logprobs) == 2 for e in entries)
    # the tokens' bytes spell the output exactly, multi-byte characters split over tokens included
    assert bytes(b for e in entries for b in e.bytes).decode() == ANSWER_OUTPUT


def test_max_tokens_cuts_with_length(client, tokenizer):
    stream = ask(client, "please ramble", max_tokens=5, stream=True)
    content, reasoning, _, finish, _, _ = accumulate(stream)
    # cut off while thinking: all of it is reasoning
    assert (finish, content, reasoning) == ("length", "", tokenizer.decode(tokenizer.encode(LONG_OUTPUT)[:5]))


# ---- completions -----------------------------------------------------------------------------------------------

def test_completions_echo_logprobs_for_text_and_token_prompts(client, tokenizer):
    prompt = "hello there"
    ids = tokenizer.encode(prompt)
    text_answer = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=6)
    ids_answer = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=3, max_tokens=6)
    for answer in (text_answer, ids_answer):
        choice = answer.choices[0]
        assert choice.text.startswith(prompt) and choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 6 and "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v == SCRIPTED_LOGPROB for v in lp.token_logprobs[1:])
        assert all(len(top) == 3 for top in lp.top_logprobs[1:])
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 6)
    assert text_answer.choices[0].text == ids_answer.choices[0].text

    streamed = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed[:-1]) == text_answer.choices[0].text
    assert streamed[-2].choices[0].finish_reason == "length"
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == 6


# ---- models, tokenize ------------------------------------------------------------------------------------------

def test_models_and_tokenize(server, client, tokenizer):
    url = server[0]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == MAX_MODEL_LEN
    headers = {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "user", "content": "Hi"}]
    by_text = httpx2.post(f"{url}/tokenize", json={"prompt": "héllo 四"}, headers=headers).json()
    by_chat = httpx2.post(f"{url}/tokenize", json={"messages": messages, "tools": TOOLS}, headers=headers).json()
    assert by_text["tokens"] == tokenizer.encode("héllo 四") and by_text["count"] == len(by_text["tokens"])
    assert by_chat["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(messages, TOOLS))
    assert by_chat["max_model_len"] == MAX_MODEL_LEN
    back = httpx2.post(f"{url}/detokenize", json={"tokens": by_text["tokens"]}, headers=headers)
    assert back.json() == {"prompt": "héllo 四"}
    refused = httpx2.post(f"{url}/detokenize", json={"tokens": [10**7]}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens.0"


# ---- errors ----------------------------------------------------------------------------------------------------

def test_over_the_context_limit_is_400_in_vllm_words(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "hi", max_tokens=MAX_MODEL_LEN)
    assert info.value.code == "context_length_exceeded"
    assert f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested" in \
        info.value.message


@pytest.mark.parametrize("call, param, words", [
    (lambda c: ask(c, "hi", temperature=-1), "temperature", "greater than or equal to 0"),
    (lambda c: ask(c, "hi", top_logprobs=30, logprobs=True), "top_logprobs", "less than or equal to 20"),
    (lambda c: c.completions.create(model=MODEL, prompt=[5, 10**6]), None, "outside the vocabulary"),
    (lambda c: ask(c, "hi", n=2), "n", "only n=1"),
])
def test_bad_parameters_are_400(client, call, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        call(client)
    assert info.value.param == param and words in info.value.message


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


def test_the_api_key_guards_everything_but_health(server):
    url = server[0]
    for wrong in ("", "sk-wrong"):
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=f"{url}/v1", api_key=wrong or "x", max_retries=0), "hi")
    assert httpx2.get(f"{url}/health").status_code == 200
    for path in ("/metrics", "/v1/models"):
        assert httpx2.get(f"{url}{path}").status_code == 401
    assert httpx2.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401


def test_a_body_over_the_cap_is_413(tokenizer):
    with scripted_server(tokenizer, max_body_bytes=2048) as (url, _, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            ask(c, "x" * 4096)
        assert info.value.status_code == 413
        assert ask(c, "small").choices[0].message.content  # under the cap, served


def test_over_max_concurrent_requests_is_429(tokenizer):
    with scripted_server(tokenizer, step_delay_s=0.01, max_concurrent_requests=1) as (url, _, engine_loop):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with ask(c, "please ramble", stream=True) as first:
            next(iter(first))  # the first request is in flight
            with pytest.raises(openai.RateLimitError):
                ask(c, "hi")
        wait_until(lambda: engine_loop.num_aborted == 1)
        assert ask(c, "hi").choices[0].finish_reason == "stop"  # its slot is free again


# ---- disconnects, engine failure -------------------------------------------------------------------------------

def test_a_client_that_disconnects_has_its_request_aborted_and_blocks_freed(tokenizer):
    with scripted_server(tokenizer, step_delay_s=0.01) as (url, engine, engine_loop):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "please ramble"}], "stream": True}
        with httpx2.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while '"reasoning_content"' not in next(lines):  # tokens are flowing
                pass
            assert engine_loop.stats.kv_blocks_used > 0
        wait_until(lambda: engine_loop.num_aborted == 1)
        assert engine_loop.stats.kv_blocks_used == 0 and not engine.has_unfinished_requests()

        # not streamed: the client gives up waiting for the whole answer
        steps = engine.steps
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        wait_until(lambda: engine_loop.num_aborted == 2)
        assert engine_loop.stats.kv_blocks_used == 0
        assert engine.steps - steps < len(tokenizer.encode(LONG_OUTPUT))  # it did not run to the end


def test_an_engine_failure_is_a_500_and_health_turns_503(tokenizer, caplog):
    with caplog.at_level(logging.ERROR, logger="moerun.serve"):
        with scripted_server(tokenizer, step_delay_s=0.01, fail_at_step=20) as (url, _, engine_loop):
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            outcome = {}

            def not_streamed():
                try:
                    ask(c, "please ramble")
                except openai.InternalServerError as e:
                    outcome["error"] = e

            thread = threading.Thread(target=not_streamed)
            thread.start()
            with pytest.raises(openai.APIError, match="engine"):
                for _ in ask(c, "please ramble", stream=True):
                    pass
            thread.join(timeout=20)
            assert outcome["error"].status_code == 500 and outcome["error"].code == "engine_dead"
            health = httpx2.get(f"{url}/health")
            assert health.status_code == 503 and "scripted failure" in health.json()["error"]["message"]
            with pytest.raises(openai.InternalServerError):
                ask(c, "hi")  # refused at once: nothing left to serve it
            assert not engine_loop.alive
    died = [r for r in caplog.records if "engine loop died" in r.getMessage()]
    assert len(died) == 1 and "\n" not in died[0].getMessage()


# ---- metrics ---------------------------------------------------------------------------------------------------

def scrape(url: str, headers=None) -> dict[tuple[str, tuple], float]:
    text = httpx2.get(f"{url}/metrics", headers=headers).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_sent(tokenizer):
    with scripted_server(tokenizer) as (url, engine, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers = [ask(c, "What is 2 + 2?"), ask(c, "What is the weather?", tools=TOOLS),
                   c.completions.create(model=MODEL, prompt="hello", max_tokens=4)]
        streamed = accumulate(ask(c, "What is 2 + 2?", stream=True, stream_options={"include_usage": True}))
        with pytest.raises(openai.BadRequestError):
            ask(c, "hi", temperature=-1)
        usages = [a.usage for a in answers] + [streamed[4].usage]
        m = scrape(url)
    chat, completions = "/v1/chat/completions", "/v1/completions"
    assert m[("moerun_http_requests_total", (("route", chat), ("status", "200")))] == 3
    assert m[("moerun_http_requests_total", (("route", chat), ("status", "400")))] == 1
    assert m[("moerun_http_requests_total", (("route", completions), ("status", "200")))] == 1
    assert m[("moerun_prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
    assert m[("moerun_generation_tokens_total", ())] == sum(u.completion_tokens for u in usages)
    assert m[("moerun_time_to_first_token_seconds_count", ())] == 4
    assert m[("moerun_inter_token_latency_seconds_count", ())] == sum(u.completion_tokens - 1 for u in usages)
    finished = {dict(k[1])["finish_reason"]: v for k, v in m.items() if k[0] == "moerun_requests_finished_total"}
    assert finished == {"stop": 2, "tool_calls": 1, "length": 1}
    assert m[("moerun_num_requests_running", ())] == 0 and m[("moerun_kv_cache_blocks_used", ())] == 0
    assert m[("moerun_kv_cache_blocks_total", ())] == engine.num_blocks and m[("moerun_engine_alive", ())] == 1
