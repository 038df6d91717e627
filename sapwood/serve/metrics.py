"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(
        self, queue_depth: Callable[[], float], running: Callable[[], float], kv_usage: Callable[[], float]
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sapwood_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "sapwood_request_latency_seconds", "request latency (to last byte for streams)", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "sapwood_time_to_first_token_seconds", "time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("sapwood_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("sapwood_generated_tokens", "tokens generated", registry=r)
        self.rejected = Counter(
            "sapwood_rejected_requests", "requests refused before generation", ["reason"], registry=r
        )
        Gauge("sapwood_queue_depth", "requests waiting for a batch slot", registry=r).set_function(
            queue_depth
        )
        Gauge("sapwood_running_requests", "requests in the running batch", registry=r).set_function(running)
        Gauge(
            "sapwood_kv_cache_usage_ratio", "live tokens / allocated KV-cache positions", registry=r
        ).set_function(kv_usage)
