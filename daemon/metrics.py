"""Prometheus metrics for `/metrics`.

One registry per daemon (tests run several). Counters the components keep
themselves (the writer's drops, the engine's restarts) are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Live(Collector):
    def __init__(self, read: Callable[[], dict[str, float]], version: Callable[[], str]) -> None:
        self._read = read
        self._version = version

    def collect(self) -> Iterator[Metric]:
        v = self._read()
        yield CounterMetricFamily(
            "adaptd_interactions_logged",
            "Interactions committed to the database.",
            value=v["logged"],
        )
        yield CounterMetricFamily(
            "adaptd_interaction_log_dropped",
            "Interactions not logged because the write queue was full.",
            value=v["dropped"],
        )
        yield CounterMetricFamily(
            "adaptd_interaction_log_failed",
            "Interactions lost to a failed commit.",
            value=v["failed"],
        )
        yield GaugeMetricFamily(
            "adaptd_write_queue_depth", "Writes waiting for the writer.", value=v["pending"]
        )
        yield GaugeMetricFamily("adaptd_engine_ready", "1 when vLLM is serving.", value=v["ready"])
        yield CounterMetricFamily(
            "adaptd_engine_restarts", "Restarts of the vLLM child.", value=v["restarts"]
        )
        info = GaugeMetricFamily(
            "adaptd_served_version", "The version the adaptd alias serves.", labels=["version"]
        )
        info.add_metric([self._version()], 1)
        yield info


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adaptd_requests", "HTTP requests.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "adaptd_request_latency_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "adaptd_tokens", "Tokens processed.", ["kind", "version"], registry=self.registry
        )
        self.feedback = Counter("adaptd_feedback", "Feedback items stored.", registry=self.registry)
        self.cycles = Counter(
            "adaptd_cycles", "Cycles ended, by decision.", ["decision"], registry=self.registry
        )
        self.cycle_seconds = Histogram(
            "adaptd_cycle_duration_seconds",
            "Wall time of a cycle, start to decision.",
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
            registry=self.registry,
        )
        self.cycle_state = Gauge(
            "adaptd_cycle_running",
            "1 while a cycle runs, by its state.",
            ["state"],
            registry=self.registry,
        )
        self.gate_checks = Counter(
            "adaptd_gate_checks",
            "Gate checks, by check and result.",
            ["check", "result"],
            registry=self.registry,
        )
        self.training_loss = Gauge(
            "adaptd_training_loss",
            "Loss of the last training run: first and final step.",
            ["when"],
            registry=self.registry,
        )
        self.promotions = Counter(
            "adaptd_promotions",
            "Changes of the served version.",
            ["action"],
            registry=self.registry,
        )
        self.refused = Counter(
            "adaptd_refused",
            "Requests and connections refused before the app: header floods, slow clients, "
            "too many connections, malformed HTTP.",
            ["status", "code"],
            registry=self.registry,
        )

    def refused_inc(self, status: int, code: str) -> None:
        self.refused.labels(str(status), code).inc()

    def watch(self, read: Callable[[], dict[str, float]], version: Callable[[], str]) -> None:
        self.registry.register(_Live(read, version))

    def render(self) -> bytes:
        return generate_latest(self.registry)
