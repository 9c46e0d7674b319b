"""Prometheus metrics of one server, in a registry of its own (two apps in one process never share counters).

Series (docs/serving.md lists them with their meaning):
- moerun_http_requests_total{route,status}: every HTTP response, 401/413 from the guards included;
- moerun_requests_finished_total{endpoint,finish_reason}: generation requests that ended: stop, length,
  tool_calls, abort (the client went away), error (the engine died);
- moerun_prompt_tokens_total, moerun_generation_tokens_total;
- moerun_time_to_first_token_seconds, moerun_inter_token_latency_seconds, moerun_e2e_request_latency_seconds
  (histograms; times from the request's arrival at the server to the engine handing over the token);
- from the engine's last step: moerun_num_requests_running, moerun_num_requests_waiting,
  moerun_kv_cache_blocks_used, moerun_kv_cache_blocks_total, moerun_kv_cache_usage_ratio,
  moerun_prefix_cache_queries_total and moerun_prefix_cache_hits_total (prompt tokens),
  moerun_prefix_cache_hit_rate (hits / queries so far), moerun_num_preemptions_total, moerun_engine_alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moerun.runtime.serve.engine_loop import Delivery, EngineLoop
from moerun.runtime.serve.http_guards import ASGIApp

# vLLM's buckets: first tokens from milliseconds (a cached prompt) to minutes (a long prefill behind a queue).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, engine_loop: EngineLoop, routes: Iterable[str]):
        self.registry = registry = CollectorRegistry()
        self._routes = frozenset(routes)
        self.http_requests = Counter("moerun_http_requests", "HTTP responses by route and status code",
                                     ["route", "status"], registry=registry)
        self.requests_finished = Counter("moerun_requests_finished", "Generation requests that ended, by reason",
                                         ["endpoint", "finish_reason"], registry=registry)
        self.prompt_tokens = Counter("moerun_prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generation_tokens = Counter("moerun_generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("moerun_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("moerun_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("moerun_e2e_request_latency_seconds", "From arrival to the request's end",
                             buckets=E2E_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine_loop))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, endpoint: str, arrival: float) -> RequestMetrics:
        return RequestMetrics(self, endpoint, arrival)

    def route_label(self, path: str) -> str:
        return path if path in self._routes else "other"  # unknown paths must not grow the label set


class RequestMetrics:
    """One generation request's share of the series: fed every delivery, ended once."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, arrival: float):
        self._m = metrics
        self._endpoint = endpoint
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._ended = False

    def accepted(self, prompt_tokens: int) -> None:
        self._m.prompt_tokens.inc(prompt_tokens)

    def delivered(self, deliveries: Iterable[Delivery]) -> None:
        for d in deliveries:
            count = len(d.output.new_token_ids)
            if not count:
                continue
            self._m.generation_tokens.inc(count)
            if self._last_token_at is None:
                self._m.ttft.observe(d.at - self._arrival)
            else:
                self._m.itl.observe(d.at - self._last_token_at)
            self._last_token_at = d.at

    def ended(self, finish_reason: str, at: float) -> None:
        if self._ended:
            return
        self._ended = True
        self._m.requests_finished.labels(self._endpoint, finish_reason).inc()
        self._m.e2e.observe(at - self._arrival)


class _EngineCollector(Collector):
    """The engine's state at scrape time, from the snapshot its thread published after its last step."""

    def __init__(self, engine_loop: EngineLoop):
        self._loop = engine_loop

    def collect(self) -> Iterator[Metric]:
        s = self._loop.stats
        yield _gauge("moerun_num_requests_running", "Requests holding KV blocks", s.num_running)
        yield _gauge("moerun_num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting)
        yield _gauge("moerun_kv_cache_blocks_used", "KV cache blocks held by requests", s.kv_blocks_used)
        yield _gauge("moerun_kv_cache_blocks_total", "KV cache blocks", s.kv_blocks_total)
        yield _gauge("moerun_kv_cache_usage_ratio", "Fraction of KV cache blocks held by requests",
                     s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield _counter("moerun_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       s.prefix_cache_queries)
        yield _counter("moerun_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield _gauge("moerun_prefix_cache_hit_rate", "Prefix cache hits / queries since start",
                     s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        yield _counter("moerun_num_preemptions", "Requests preempted (their KV blocks freed, to be recomputed)",
                       s.num_preemptions)
        yield _gauge("moerun_engine_alive", "1 while the engine loop runs, 0 once it has died", int(self._loop.alive))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class CountResponses:
    """ASGI middleware (outermost, so the guards' 401 and 413 count too): each response's status, by route."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.metrics.route_label(scope["path"])

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
