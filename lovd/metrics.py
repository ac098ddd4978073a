"""Prometheus metrics, on a registry owned by the app (no process-global registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lovd.session.model import STATES, SessionState


class _SessionsByState(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> list[GaugeMetricFamily]:
        g = GaugeMetricFamily("lovd_sessions", "Sessions by state", labels=["state"])
        counts = self._counts()
        for state in STATES:
            if state != SessionState.DELETED:
                g.add_metric([state], counts.get(state, 0))
        return [g]


class _UsageBySession(Collector):
    """Per-session usage of the sessions that still exist (bounded by the session count)."""

    def __init__(self, usage: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._usage = usage

    def collect(self) -> list[GaugeMetricFamily]:
        tokens = GaugeMetricFamily(
            "lovd_session_llm_tokens", "LLM tokens used by a session", labels=["session", "kind"]
        )
        calls = GaugeMetricFamily(
            "lovd_session_broker_calls",
            "Calls a session made through the broker",
            labels=["session", "kind"],
        )
        for sid, u in self._usage().items():
            tokens.add_metric([sid, "input"], u["input_tokens"])
            tokens.add_metric([sid, "output"], u["output_tokens"])
            calls.add_metric([sid, "llm"], u["llm_requests"])
            calls.add_metric([sid, "mcp"], u["mcp_requests"])
            calls.add_metric([sid, "refused"], u["refused"])
        return [tokens, calls]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lovd_http_requests",
            "API requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.sessions_created = Counter(
            "lovd_sessions_created", "Sessions created", registry=self.registry
        )
        self.transitions = Counter(
            "lovd_session_transitions",
            "Session state changes (from: 'new' for a new row), by lovd/session/machine.py",
            ["from", "to"],
            registry=self.registry,
        )
        self.warm_claims = Counter(
            "lovd_warm_claims",
            "Session creations served from the warm pool (hit) or by a cold start (miss)",
            ["result"],
            registry=self.registry,
        )
        self.start_seconds = Histogram(
            "lovd_session_start_seconds",
            "Time from start to ready",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.broker_requests = Counter(
            "lovd_broker_requests",
            "Calls through the credential broker, by upstream and HTTP status",
            ["upstream", "status"],
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "lovd_llm_tokens",
            "LLM tokens used through the broker (from the providers' usage fields)",
            ["kind"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "lovd_reconcile_seconds", "Duration of a reconcile pass", registry=self.registry
        )

    def track_sessions(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_SessionsByState(counts))

    def track_usage(self, usage: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.registry.register(_UsageBySession(usage))

    def render(self) -> bytes:
        return generate_latest(self.registry)
