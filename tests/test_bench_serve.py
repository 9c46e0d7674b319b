"""`moerun bench serve` against a scripted fake OpenAI server on loopback: the counts it reports are the ones the
fake sent, its percentiles are those of its own per-request timings (recomputed here with the statistics module),
and it never has more requests in flight than the level allows."""

from __future__ import annotations

import json
import math
import socket
import statistics

import openai
import pytest

from fake_openai_server import MODEL, FakeOpenAI, Script
from live_server import serve_in_thread
from moerun.runtime.cli import main
from moerun.runtime.serve_bench import arrival_offsets

LEVELS = (1, 4)
REQUESTS = 10


def run_bench(tmp_path, script: Script, *extra: str) -> tuple[dict, FakeOpenAI]:
    fake = FakeOpenAI(script)
    out = tmp_path / "serve.json"
    with serve_in_thread(fake.app) as url:
        code = main(["bench", "serve", "--endpoint", f"{url}/v1", "--concurrency", ",".join(map(str, LEVELS)),
                     "--num-requests", str(REQUESTS), "--input-len", "8", "--output-len", "6",
                     "--random-range-ratio", "0.5", "--warmup", "0", "--seed", "3", "--out", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text()), fake


def level_records(fake: FakeOpenAI, level: int):
    # Levels run one after the other, so the fake's requests 1..N belong to the first level, and so on.
    return sorted(fake.records, key=lambda r: r.number)[level * REQUESTS:(level + 1) * REQUESTS]


def p99(values):
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def test_counts_and_percentiles_are_what_the_fake_did(tmp_path, capsys):
    result, fake = run_bench(tmp_path, Script(fail_every=4, tokens_per_chunk=2, first_token_delay_s=0.02))
    assert "concurrency" in capsys.readouterr().out  # the table
    assert result["model"] == MODEL  # discovered from GET /v1/models
    for level, summary in enumerate(result["levels"]):
        records = level_records(fake, level)
        ok = [r for r in records if not r.failed]
        assert summary["concurrency"] == LEVELS[level]
        assert (summary["completed"], summary["failed"]) == (len(ok), len(records) - len(ok)) and len(ok) < REQUESTS
        assert summary["errors"] == ["HTTP 500: scripted failure"]
        # tokens come from the usage chunk: exact, although each chunk carried two tokens
        assert summary["output_tokens_counted_from"] == "usage"
        assert summary["output_tokens"] == sum(r.tokens for r in ok)
        assert summary["prompt_tokens"] == sum(r.prompt_tokens for r in ok)
        assert sorted(q["output_tokens"] for q in summary["requests"] if q["ok"]) == sorted(r.tokens for r in ok)
        assert summary["output_tokens_per_s"] == pytest.approx(summary["output_tokens"] / summary["duration_s"])
        # percentiles of the per-request figures it recorded, recomputed independently
        timed = [q for q in summary["requests"] if q["ok"]]
        ttft = [q["ttft_ms"] for q in timed]
        assert summary["ttft_ms"]["p50"] == pytest.approx(statistics.median(ttft))
        assert summary["ttft_ms"]["p99"] == pytest.approx(p99(ttft))
        tpot = [(q["latency_ms"] - q["ttft_ms"]) / (q["output_tokens"] - 1) for q in timed if q["output_tokens"] > 1]
        assert summary["tpot_ms"]["p50"] == pytest.approx(statistics.median(tpot))
        itl = [gap for q in timed for gap in q["itl_ms"]]
        assert summary["itl_ms"]["p99"] == pytest.approx(p99(itl))
        assert sorted(len(q["itl_ms"]) + 1 for q in timed) == sorted(r.chunks for r in ok)
        # the fake waited 20 ms before its first token: no measured TTFT can be shorter (causality, not speed)
        assert min(ttft) >= 20
        assert max(r.in_flight_at_start for r in records) <= LEVELS[level]
    for record in fake.records:  # what was sent: ignore_eos-style controls and the usage request
        body = record.body
        assert 3 <= body["max_tokens"] <= 9 and body["min_tokens"] == body["max_tokens"] and body["ignore_eos"]
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["messages"][0]["role"] == "user" and 4 <= record.prompt_tokens <= 12
    # every level gets prompts of its own: a prefix cache cannot serve one level from another's
    prompts = [r.body["messages"][0]["content"] for r in fake.records]
    assert len(set(prompts)) == len(prompts)


def test_without_usage_tokens_are_counted_from_chunks(tmp_path):
    result, fake = run_bench(tmp_path, Script(usage=False), "--no-ignore-eos", "--concurrency", "2")
    (summary,) = result["levels"]
    assert summary["output_tokens_counted_from"] == "chunks"
    assert summary["output_tokens"] == sum(r.chunks for r in fake.records) == sum(r.tokens for r in fake.records)
    assert summary["prompt_tokens"] == 0  # no usage: the prompt size is not known
    assert all("ignore_eos" not in r.body and r.tokens == max(1, r.body["max_tokens"] // 2) for r in fake.records)


def test_completions_without_streaming(tmp_path):
    result, fake = run_bench(tmp_path, Script(), "--api", "completions", "--no-stream", "--concurrency", "3",
                             "--model", "named", "--extra-body", '{"temperature": 0}')
    (summary,) = result["levels"]
    assert summary["completed"] == REQUESTS and summary["output_tokens"] == sum(r.tokens for r in fake.records)
    assert summary["ttft_ms"]["p50"] is None and summary["e2e_ms"]["p50"] is not None
    body = fake.records[0].body
    assert (body["model"], body["temperature"], body["stream"]) == ("named", 0, False) and "prompt" in body


def test_the_fake_speaks_openai(tmp_path):
    """The fake's streams are built with moerun's chunk builders; the real client reads them, usage chunk too."""
    fake = FakeOpenAI(Script(tokens_per_chunk=3))
    with serve_in_thread(fake.app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b c"}],
                                                     max_tokens=7, stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok " * 7 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
        completion = client.completions.create(model=MODEL, prompt="a b", max_tokens=4, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == "tok " * 4 and completion.usage.prompt_tokens == 2


def test_poisson_arrivals():
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(4001, 50.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and min(gaps) > 0
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential gaps: mean 1/rate
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.08)  # ... and standard deviation 1/rate
    assert arrival_offsets(5, 50.0, seed=1) == offsets[:5]


@pytest.fixture
def refused_url():
    """A loopback port this test holds without listening on it: connections to it are refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}/v1"


@pytest.mark.parametrize("args, words", [
    (["--concurrency", "0,4"], "--concurrency"),
    (["--request-rate", "fast"], "--request-rate"),
    (["--extra-body", "[1]"], "--extra-body"),
])
def test_bad_options_are_one_line_and_exit_2(args, words, capsys, refused_url):
    assert main(["bench", "serve", "--endpoint", refused_url, "--model", "m", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moerun: error:") and words in err and len(err.splitlines()) == 1


def test_an_unreachable_endpoint_without_a_model_name_is_one_line(capsys, tmp_path, refused_url):
    assert main(["bench", "serve", "--endpoint", refused_url, "--out", str(tmp_path / "x.json")]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
