"""`moerun serve`'s app on the real engine (the demo checkpoint, fp32 on the CPU reference backend), through the
real `openai` client over loopback: continuous batching under 64 concurrent streams gives each request what it
gets alone, echoed logprobs are the model's teacher-forced distribution, and a client that leaves frees its KV
blocks at once."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from live_server import serve_in_thread, wait_until
from moerun.runtime.engine import Engine
from moerun.runtime.run_config import BUILTIN_DEMO, parse_run_config
from moerun.runtime.serve.app import AppOptions, create_app

MODEL = "demo"
QUESTIONS = ["What is the weather in Paris?", "hi", "Tell me a story about a cat and a dog.", "What is 17 + 25?",
             "List three colours.", "Why is the sky blue? Answer briefly, please.", "ok", "Translate 'cat' to French."]
STREAMS = 64
TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = parse_run_config({"backend": "cpu", "model": {"path": BUILTIN_DEMO, "dtype": "float32"},
                            "kv_cache": {"num_blocks": 1024}, "scheduler": {"max_num_seqs": STREAMS}},
                           base_dir=tmp_path_factory.mktemp("serve"))
    engine = Engine(run)
    app, engine_loop = create_app(engine, AppOptions(MODEL))
    with serve_in_thread(app, lifespan="on") as url:
        yield url, engine_loop


def engine_stats(engine_loop):
    return engine_loop.call(lambda engine: engine.stats()).result(timeout=30)


def test_64_concurrent_streams_each_equal_to_the_request_alone(served):
    url, engine_loop = served
    greedy = dict(model=MODEL, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    alone = {q: client.chat.completions.create(messages=[{"role": "user", "content": q}], **greedy).choices[0].message
             for q in QUESTIONS}

    async def stream(c: openai.AsyncOpenAI, question: str) -> tuple[str, str, int]:
        text, reasoning, usage = "", "", None
        async for chunk in await c.chat.completions.create(messages=[{"role": "user", "content": question}],
                                                           stream=True, stream_options={"include_usage": True},
                                                           **greedy):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            usage = chunk.usage or usage
        return text, reasoning, usage.completion_tokens

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(stream(c, QUESTIONS[i % len(QUESTIONS)]) for i in range(STREAMS)))

    results = asyncio.run(all_at_once())
    assert len(results) == STREAMS
    for i, (text, reasoning, tokens) in enumerate(results):
        expected = alone[QUESTIONS[i % len(QUESTIONS)]]
        assert tokens == TOKENS
        assert (text or None, reasoning or None) == (expected.content, expected.model_extra["reasoning_content"])
    stats = engine_stats(engine_loop)
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert stats.prefix_cache_hits > 0  # the repeated questions shared their prompt blocks


def test_echoed_logprobs_are_the_teacher_forced_distribution(served):
    url, engine_loop = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt = httpx2.post(f"{url}/tokenize", json={"prompt": "The cat sat on the mat."}).json()["tokens"]
    top = 5
    answer = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=top, max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True,
                                                                  "return_tokens_as_token_ids": True})
    lp = answer.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 6
    logits, vocab = engine_loop.call(lambda engine: (engine.logits(ids), engine.sample_vocab_size)).result(60)
    reference = logits[:, :vocab].log_softmax(-1)  # row i: the distribution of token i + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        row = reference[i - 1]
        assert lp.token_logprobs[i] == pytest.approx(row[ids[i]].item(), abs=1e-4)
        values, top_ids = row.topk(top)
        given = lp.top_logprobs[i]
        assert {int(t.removeprefix("token_id:")) for t in given} == set(top_ids.tolist())
        assert sorted(given.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
    # greedy: every generated token is the teacher-forced argmax of its position
    assert reference[len(prompt) - 1:-1].argmax(-1).tolist() == ids[len(prompt):]


def test_a_client_that_leaves_frees_its_blocks_at_once(served):
    url, engine_loop = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    aborted = engine_loop.num_aborted
    with client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500,
                                        stream=True, extra_body={"ignore_eos": True}) as stream:
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role, then a generated token
        assert engine_stats(engine_loop).kv_blocks_used > 0
    wait_until(lambda: engine_loop.num_aborted == aborted + 1, what="the abort")
    stats = engine_stats(engine_loop)
    assert (stats.num_running, stats.kv_blocks_used) == (0, 0)
