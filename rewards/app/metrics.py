"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    """Request counts and latency, items scored, and batch sizes (is the queue batching?)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "reward_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "reward_request_seconds", "request latency", ["endpoint"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.items = Counter("reward_items", "items scored by scorer", ["scorer"], registry=self.registry)
        self.batch_size = Histogram(
            "reward_batch_size", "items per model call", ["scorer"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.batch_seconds = Histogram("reward_batch_seconds", "model call time", ["scorer"], registry=self.registry)

    def batch_observer(self, scorer: str):
        def observe(size: int, seconds: float) -> None:
            self.items.labels(scorer).inc(size)
            self.batch_size.labels(scorer).observe(size)
            self.batch_seconds.labels(scorer).observe(seconds)

        return observe
