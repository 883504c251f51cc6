"""Prometheus request metrics of one serving app, on its own CollectorRegistry (two apps in a process never mix).

    metrics = ServingMetrics()
    metrics.observe("support-assistant", "3", "canary", "200", latency_s=0.041, completion_tokens=12)
    generate_latest(metrics.registry)
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapterops_requests_total", "Completion requests served, by adapter and outcome",
                                ["family", "version", "route", "status"], registry=r)
        self.errors = Counter("adapterops_request_errors_total", "Failed requests, by adapter and kind",
                              ["family", "version", "type"], registry=r)
        self.latency = Histogram("adapterops_request_latency_seconds", "End-to-end completion latency",
                                 ["family", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("adapterops_completion_tokens_total", "Generated tokens", ["family", "version"],
                              registry=r)
        self.rejected = Counter("adapterops_requests_rejected_total",
                                "Requests refused before they reached the engine (bad input, unknown model, "
                                "context too long), by reason", ["reason"], registry=r)
        self.feedback = Counter("adapterops_feedback_total", "Feedback scores received", registry=r)
        self.log_failures = _SumCounter()
        """Records the server could not hand to the prediction log; plus the log's own losses (watch_log)."""
        self.adapters_loaded = Gauge("adapterops_adapters_loaded", "Adapters in the pool", registry=r)
        self.rollout_weight = Gauge("adapterops_rollout_challenger_weight", "Challenger traffic share of a family",
                                    ["family"], registry=r)
        self.adapter_switches = Gauge("adapterops_adapter_switches", "Adapter switches done by the pool", registry=r)
        r.register(self.log_failures)
        self.rollout_state_failures = _SumCounter(
            "adapterops_rollout_state_failures", "Canary samples and feedback the shared rollout state database "
            "(serving/rollout_shared.py) could not store; 0 with a file-backed rollout state")
        r.register(self.rollout_state_failures)
        self.fallback_state_failures = _SumCounter(
            "adapterops_fallback_state_failures", "Polls and changes of the shared drift-fallback state "
            "(serving/fallback_shared.py) that could not reach its database; 0 with a file-backed state")
        r.register(self.fallback_state_failures)

    def watch_fallbacks(self, routes: Callable[[], dict]) -> None:
        """Export adapterops_fallback_active{family, fallback} from `routes()` (Router.families()) at scrape time."""
        self.registry.register(_FallbackCollector(routes))

    def watch_log(self, log) -> None:
        """Export adapterops_prediction_log_failures_total: records refused at enqueue plus every record the
        log lost afterwards (monitoring.store.PredictionLog.failures: queue full, SQLite refused, writer error)."""
        self.log_failures.sources.append(lambda: getattr(log, "failures", 0))

    def watch_rollout(self, controller) -> None:
        """Export adapterops_rollout_state_failures_total from a shared controller's `failures` count."""
        if controller is not None and hasattr(controller, "failures"):
            self.rollout_state_failures.sources.append(lambda: controller.failures)

    def watch_fallback(self, policy) -> None:
        """Export adapterops_fallback_state_failures_total from a shared fallback policy's `failures` count."""
        if policy is not None and hasattr(policy, "failures"):
            self.fallback_state_failures.sources.append(lambda: policy.failures)

    def observe(self, family: str, version: str, route: str, status: str, latency_s: float,
                completion_tokens: int = 0) -> None:
        self.requests.labels(family, version, route, status).inc()
        self.latency.labels(family, version).observe(latency_s)
        if completion_tokens:
            self.tokens.labels(family, version).inc(completion_tokens)

    def error(self, family: str, version: str, kind: str) -> None:
        self.errors.labels(family, version, kind).inc()


class _FallbackCollector:
    """1 for a family whose champion share goes to a fallback (labelled with it; "base" = adapters off), else 0."""

    def __init__(self, routes: Callable[[], dict]):
        self.routes = routes

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("adapterops_fallback_active", "1 while the family's champion traffic goes to its "
                                 "fallback (label fallback: the version, 'base' = adapters off)",
                                 labels=["family", "fallback"])

    def describe(self):
        yield self._family()

    def collect(self):
        g = self._family()
        for family, route in sorted(self.routes().items()):
            g.add_metric([family, route.fallback or ""], 1.0 if route.fallback is not None else 0.0)
        yield g


class _SumCounter:
    """A counter whose value is its own increments plus other counts read at scrape time."""

    NAME = "adapterops_prediction_log_failures"
    HELP = ("Prediction-log records lost (refused at enqueue, dropped on a full queue, refused by the database or "
            "lost to a writer error)")

    def __init__(self, name: str | None = None, help: str | None = None):
        self.name, self.help = name or self.NAME, help or self.HELP
        self._lock = threading.Lock()
        self._own = 0
        self.sources: list[Callable[[], int]] = []

    def inc(self, amount: int = 1) -> None:
        with self._lock:
            self._own += amount

    def value(self) -> float:
        total = self._own
        for source in self.sources:
            try:
                total += int(source())
            except Exception:  # a closed log still reports; a broken source must not break /metrics
                continue
        return float(total)

    def _family(self, value: float | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.help, value=value)

    def describe(self):
        yield self._family()

    def collect(self):
        yield self._family(self.value())
