"""Prometheus metrics, in a registry of the app's own (several apps in one process do not clash).

Engine figures (sessions, resident state bytes, queue depth, tokens ingested and generated) are read from the
engine at scrape time; request latency is a histogram observed by `LatencyMiddleware`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)


class EngineCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None]):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        m = engine.metrics() if engine is not None else {}
        yield GaugeMetricFamily("fam_sessions", "Sessions (in memory or spilled to disk)", value=m.get("sessions", 0))
        yield GaugeMetricFamily("fam_sessions_resident", "Sessions whose state is in memory",
                                value=m.get("sessions_resident", 0))
        yield GaugeMetricFamily("fam_state_bytes", "Bytes of session states in memory",
                                value=m.get("state_bytes_resident", 0))
        yield GaugeMetricFamily("fam_queue_depth", "Requests running or waiting on the model worker",
                                value=m.get("queue_depth", 0))
        yield GaugeMetricFamily("fam_ingest_busy_tokens", "Ingest tokens per engine step while chats run (sized "
                                "to FAM_BULK_SECONDS_BUSY from the passes measured)",
                                value=m.get("ingest_busy_tokens", 0))
        yield CounterMetricFamily("fam_tokens_ingested", "Tokens ingested into sessions",
                                  value=m.get("tokens_ingested", 0))
        yield CounterMetricFamily("fam_tokens_generated", "Tokens sampled", value=m.get("tokens_generated", 0))


class Metrics:
    def __init__(self, engine: Callable[[], Engine | None]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.latency = Histogram("fam_request_seconds", "HTTP request latency (to the end of the response body)",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)


class LatencyMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, not the raw path
            self.metrics.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
