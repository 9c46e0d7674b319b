"""`moerun bench serve`: load an OpenAI-compatible endpoint (moerun serve, vLLM, SGLang, transformers serve, ...)
with synthetic requests at several concurrency levels; print a table and write every figure as JSON."""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import click
import httpx2

from moerun.backends.errors import MoerunError
from moerun.runtime import serve_bench
from moerun.runtime.commands.common import FiniteFloat, check_output_path, write_atomically
from moerun.runtime.table import format_table


def _levels(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MoerunError(f"--concurrency: expected comma-separated positive integers like 1,16,64, got {text!r}")
    return values


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate > 0:
        raise MoerunError(f"--request-rate: expected a positive number of requests per second or 'inf', got {text!r}")
    return rate


def _extra_body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoerunError(f"--extra-body: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MoerunError("--extra-body: expected a JSON object like '{\"temperature\": 0}'")
    return value


def api_url(endpoint: str, api: str) -> str:
    """The request URL: `endpoint` is the API's base (http://host:port/v1); a full .../chat/completions or
    .../completions URL is used as given."""
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/chat/completions") or endpoint.endswith("/completions"):
        return endpoint
    return f"{endpoint}/{'chat/completions' if api == 'chat' else 'completions'}"


def _base_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        endpoint = endpoint.removesuffix(suffix)
    return endpoint


async def _served_model(client: httpx2.AsyncClient, endpoint: str) -> str:
    url = f"{_base_url(endpoint)}/models"
    try:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx2.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise MoerunError(f"{url}: could not read the served model ({type(e).__name__}: {e}); pass --model") from None


async def _run(endpoint: str, api_key: str | None, model: str | None, workload_args: dict[str, Any],
               levels: list[int], rate: float, warmup: int, timeout_s: float) -> tuple[str, list[dict[str, Any]]]:
    async with serve_bench.new_client(api_key, max(levels), timeout_s) as client:
        model = model or await _served_model(client, endpoint)
        workload = serve_bench.Workload(model=model, **workload_args)
        url = api_url(endpoint, workload.api)
        for spec in serve_bench.build_requests(workload, "warmup", warmup):  # untimed: lets a server compile first
            await serve_bench.send_request(client, url, serve_bench.request_body(workload, spec))
        summaries = []
        for concurrency in levels:
            specs = serve_bench.build_requests(workload, f"concurrency-{concurrency}")
            results, duration = await serve_bench.run_level(client, url, workload, specs, concurrency, rate)
            summary = serve_bench.summarize(results, duration, concurrency, rate)
            summaries.append(summary)
            first_error = f" (first error: {summary['errors'][0]})" if summary["errors"] else ""
            click.echo(f"concurrency {concurrency}: {summary['completed']}/{len(results)} ok in {duration:.1f} s"
                       f"{first_error}", err=True)
        return model, summaries


def report(summaries: list[dict[str, Any]]) -> str:
    def ms(stats: dict[str, float | None], key: str) -> str:
        return "-" if stats[key] is None else f"{stats[key]:.1f}"

    headers = ["concurrency", "rate", "ok", "failed", "out tok/s", "total tok/s", "TTFT p50", "TTFT p99",
               "TPOT p50", "TPOT p99", "ITL p50", "ITL p99"]
    rows = [[s["concurrency"], s["request_rate"], s["completed"], s["failed"], f"{s['output_tokens_per_s']:.1f}",
             f"{s['total_tokens_per_s']:.1f}", ms(s["ttft_ms"], "p50"), ms(s["ttft_ms"], "p99"),
             ms(s["tpot_ms"], "p50"), ms(s["tpot_ms"], "p99"), ms(s["itl_ms"], "p50"), ms(s["itl_ms"], "p99")]
            for s in summaries]
    return format_table(headers, rows, align="right") + "\n(latencies in ms)"


@click.command("serve")
@click.option("--endpoint", required=True, help="Base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1.")
@click.option("--api-key", envvar="MOERUN_API_KEY", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--model", default=None, help="Model name to send [default: the first of GET /models].")
@click.option("--api", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True, help="Without streaming there is no TTFT.")
@click.option("--concurrency", default="1,16,64", show_default=True, help="Levels: at most N requests in flight.")
@click.option("--request-rate", default="inf", show_default=True, help="Requests per second (Poisson) or inf.")
@click.option("--num-requests", type=click.IntRange(1), default=100, show_default=True, help="Per level.")
@click.option("--input-len", type=click.IntRange(1), default=128, show_default=True, help="Prompt words.")
@click.option("--output-len", type=click.IntRange(1), default=128, show_default=True, help="max_tokens per request.")
@click.option("--random-range-ratio", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Lengths uniform in [len*(1-r), len*(1+r)]; 0 keeps them fixed.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Send ignore_eos and min_tokens so every request generates --output-len tokens.")
@click.option("--extra-body", default=None, help="JSON object merged into every request body.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed requests first.")
@click.option("--timeout", type=FiniteFloat(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds per request.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, help="JSON results file [bench_results/serve-<time>.json].")
def serve(endpoint, api_key, model, api, stream, concurrency, request_rate, num_requests, input_len, output_len,
          random_range_ratio, ignore_eos, extra_body, warmup, timeout, seed, out):
    """Throughput and latency of an OpenAI-compatible endpoint under load."""
    levels, rate = _levels(concurrency), _rate(request_rate)
    if out:
        out_path = check_output_path(out)
    else:
        out_path = Path("bench_results") / f"serve-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
    workload_args = dict(api=api, input_len=input_len, output_len=output_len, range_ratio=random_range_ratio,
                         num_requests=num_requests, seed=seed, stream=stream, ignore_eos=ignore_eos,
                         extra_body=_extra_body(extra_body))
    model, summaries = asyncio.run(_run(endpoint, api_key, model, workload_args, levels, rate, warmup, timeout))
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "moerun " + " ".join(sys.argv[1:]),
        "endpoint": endpoint, "model": model, "host": platform.node(),
        "workload": {**workload_args, "request_rate": "inf" if math.isinf(rate) else rate, "warmup": warmup},
        "levels": summaries,
    }
    click.echo(report(summaries))
    write_atomically(out_path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    click.echo(f"\nwrote {out_path}")
