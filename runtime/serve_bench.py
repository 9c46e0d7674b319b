"""The load generator behind `moerun bench serve`: synthetic requests against any OpenAI-compatible endpoint, at
several concurrency levels, with per-request timings and a summary per level.

Definitions (docs/serving.md has the long form):
- TTFT: from sending the request to the first stream chunk that carries generated text (content, reasoning,
  tool-call arguments, or completion text);
- ITL: the gaps between consecutive text-carrying chunks, pooled over requests (a chunk may carry several tokens);
- TPOT: per request (latency - TTFT) / (output tokens - 1);
- output tokens: the server's usage.completion_tokens (stream_options.include_usage is sent), else the number of
  text-carrying chunks;
- throughput: tokens of the successful requests divided by the level's wall time (first send to last reply).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx2
import numpy as np

# Short common English words: most byte-level BPE vocabularies hold each as one token with its leading space, so a
# prompt of N words is close to N tokens (the server's usage reports the real count).
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part").split()


@dataclasses.dataclass(frozen=True)
class Workload:
    api: Literal["chat", "completions"]
    model: str
    input_len: int
    output_len: int
    range_ratio: float  # lengths drawn uniformly from [len * (1 - r), len * (1 + r)]; 0: fixed
    num_requests: int
    seed: int
    stream: bool = True
    ignore_eos: bool = True
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    ok: bool
    latency_s: float
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tokens_from_usage: bool = False
    ttft_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def _lengths(rng: random.Random, mean: int, ratio: float, count: int) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(low, high) if ratio > 0 else mean for _ in range(count)]


def build_requests(workload: Workload, part: str, count: int | None = None) -> list[RequestSpec]:
    """`count` (default: the workload's) requests for one part of a run (a concurrency level, the warm-up): the
    same prompts and lengths for the same seed and part, so two servers get identical work, and different ones
    for different parts, so a server's prefix cache never serves one level from another's prompts."""
    rng = random.Random(f"{workload.seed}/{part}")
    count = workload.num_requests if count is None else count
    inputs = _lengths(rng, workload.input_len, workload.range_ratio, count)
    outputs = _lengths(rng, workload.output_len, workload.range_ratio, count)
    return [RequestSpec(" ".join(rng.choice(WORDS) for _ in range(n_in)), n_out) for n_in, n_out in zip(inputs, outputs)]


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: all at once for an infinite rate, else a Poisson process."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def request_body(workload: Workload, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": workload.model, "max_tokens": spec.max_tokens, "stream": workload.stream}
    if workload.api == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if workload.stream:
        body["stream_options"] = {"include_usage": True}
    if workload.ignore_eos:  # vLLM, SGLang and moerun read these; they make every request produce max_tokens
        body.update(ignore_eos=True, min_tokens=spec.max_tokens)
    return {**body, **workload.extra_body}


def _chunk_has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
        if any((call.get("function") or {}).get("arguments") for call in delta.get("tool_calls") or []):
            return True
    return False


async def send_request(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    try:
        if body.get("stream"):
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    return _http_failure(start, response.status_code, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return RequestResult(False, time.perf_counter() - start, error=_error_text(chunk))
                    if _chunk_has_text(chunk):
                        arrivals.append(time.perf_counter())
                    usage = chunk.get("usage") or usage
        else:
            response = await client.post(url, json=body)
            if response.status_code != 200:
                return _http_failure(start, response.status_code, response.text)
            usage = response.json().get("usage")
    except (httpx2.HTTPError, json.JSONDecodeError, OSError) as e:
        return RequestResult(False, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    counted = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return RequestResult(
        True, end - start, prompt_tokens=usage.get("prompt_tokens") if isinstance(usage, dict) else None,
        output_tokens=counted if isinstance(counted, int) else len(arrivals), tokens_from_usage=isinstance(counted, int),
        ttft_s=arrivals[0] - start if arrivals else None, itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])])


def _http_failure(start: float, status: int, text: str) -> RequestResult:
    try:
        message = _error_text(json.loads(text))
    except (json.JSONDecodeError, AttributeError):
        message = text.strip()[:200]
    return RequestResult(False, time.perf_counter() - start, error=f"HTTP {status}: {message}")


def _error_text(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message", error)) if isinstance(error, dict) else str(error or payload)[:200]


async def run_level(client: httpx2.AsyncClient, url: str, workload: Workload, specs: Sequence[RequestSpec],
                    concurrency: int, rate: float) -> tuple[list[RequestResult], float]:
    """Every request of the workload, at most `concurrency` in flight, sent at `rate` per second.
    Returns the results in request order and the wall time."""
    gate = asyncio.Semaphore(concurrency)
    offsets = arrival_offsets(len(specs), rate, workload.seed)
    t0 = time.perf_counter()

    async def one(spec: RequestSpec, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        async with gate:
            return await send_request(client, url, request_body(workload, spec))

    results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
    return list(results), time.perf_counter() - t0


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values, dtype=np.float64) * 1e3
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def summarize(results: Sequence[RequestResult], duration_s: float, concurrency: int, rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    sources = {r.tokens_from_usage for r in ok}
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "concurrency": concurrency, "request_rate": "inf" if math.isinf(rate) else rate,
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s, "prompt_tokens": prompt, "output_tokens": output,
        "output_tokens_counted_from": "usage" if sources == {True} else "chunks" if sources == {False} else "mixed",
        "requests_per_s": len(ok) / duration_s, "output_tokens_per_s": output / duration_s,
        "total_tokens_per_s": (prompt + output) / duration_s,
        "ttft_ms": percentiles_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": percentiles_ms([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": percentiles_ms([r.latency_s for r in ok]),
        "errors": errors[:5],
        "requests": [{"ok": r.ok, "error": r.error, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                      "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3, "latency_ms": r.latency_s * 1e3,
                      "itl_ms": [g * 1e3 for g in r.itl_s]} for r in results],
    }


def new_client(api_key: str | None, concurrency: int, timeout_s: float) -> httpx2.AsyncClient:
    # trust_env off: a proxy from the environment between the load generator and the server distorts timings.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(timeout_s), trust_env=False,
                              limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
