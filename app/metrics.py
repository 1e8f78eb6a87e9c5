"""The router's own counters: plain integers on the hot path, rendered on demand.

`RouterMetrics.snapshot()` gives the JSON for `/metrics`; `RouterMetrics.collector()` yields the same
figures as Prometheus families for `prometheus_client` (no global registry: one per app).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

SAMPLE_WINDOW = 4096


def percentiles(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "count": len(ordered)}


@dataclass(slots=True)
class BackendCounters:
    requests: int = 0
    errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class RequestRecord:
    """What one finished request contributes to the counters."""

    endpoint: str
    status: int
    backend: str | None = None
    outcome: str | None = None
    affinity: str | None = None
    ttft_ms: float | None = None
    tps: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    bytes_out: int = 0
    retries: int = 0
    error_kind: str | None = None
    stream: bool = False


class RouterMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.affinity: Counter[str] = Counter()
        self.backends: dict[str, BackendCounters] = {}
        self.ttft_ms: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.tps: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.tokens: Counter[str] = Counter()
        self.bytes_out = 0
        self.retries = 0
        self.streams = 0
        self.client_disconnects = 0

    def record(self, rec: RequestRecord) -> None:
        self.requests[(rec.endpoint, rec.status)] += 1
        if rec.error_kind:
            self.errors[rec.error_kind] += 1
        if rec.stream:
            self.streams += 1
        self.retries += rec.retries
        self.bytes_out += rec.bytes_out
        if rec.ttft_ms is not None:
            self.ttft_ms.append(rec.ttft_ms)
        if rec.tps is not None:
            self.tps.append(rec.tps)
        self.tokens["prompt"] += rec.prompt_tokens
        self.tokens["completion"] += rec.completion_tokens
        self.tokens["cached"] += rec.cached_tokens
        if rec.outcome:
            self.outcomes[rec.outcome] += 1
        if rec.affinity:
            self.affinity[rec.affinity] += 1
        if rec.backend:
            counters = self.backends.setdefault(rec.backend, BackendCounters())
            counters.requests += 1
            if rec.error_kind:
                counters.errors += 1
            if rec.outcome:
                counters.outcomes[rec.outcome] += 1
            counters.prompt_tokens += rec.prompt_tokens
            counters.cached_tokens += rec.cached_tokens

    def snapshot(self, extra: dict[str, Any]) -> dict[str, Any]:
        prompt = self.tokens["prompt"]
        return {
            "requests": {
                "total": sum(self.requests.values()),
                "streams": self.streams,
                "by_endpoint_status": {
                    f"{e} {s}": n for (e, s), n in sorted(self.requests.items())
                },
            },
            "errors": dict(self.errors),
            "retries": self.retries,
            "client_disconnects": self.client_disconnects,
            "cache_outcomes": dict(self.outcomes),
            "affinity": dict(self.affinity),
            "ttft_ms": percentiles(self.ttft_ms),
            "tps": percentiles(self.tps),
            "tokens": {
                "prompt": prompt,
                "completion": self.tokens["completion"],
                "cached": self.tokens["cached"],
                "cached_ratio": round(self.tokens["cached"] / prompt, 4) if prompt else None,
            },
            "bytes_relayed": self.bytes_out,
            "backend_counters": {
                name: {
                    "requests": c.requests,
                    "errors": c.errors,
                    "hits": c.outcomes["hit"],
                    "misses": c.outcomes["miss"],
                    "spills": c.outcomes["spill"],
                    "reassigned": c.outcomes["reassigned"],
                    "cached_ratio": round(c.cached_tokens / c.prompt_tokens, 4)
                    if c.prompt_tokens
                    else None,
                }
                for name, c in sorted(self.backends.items())
            },
            **extra,
        }

    def collector(
        self,
        gauges: Callable[[], dict[str, dict[str, float]]],
        ownership_fallbacks: Callable[[], int],
    ) -> Collector:
        """Prometheus view. `gauges()` gives live per-backend gauges: {metric: {backend: value}}."""
        return _PromCollector(self, gauges, ownership_fallbacks)


class _PromCollector(Collector):
    def __init__(
        self,
        m: RouterMetrics,
        gauges: Callable[[], dict[str, dict[str, float]]],
        ownership_fallbacks: Callable[[], int],
    ) -> None:
        self.m = m
        self.gauges = gauges
        self.ownership_fallbacks = ownership_fallbacks

    def collect(self) -> Iterator[Any]:
        m = self.m
        requests = CounterMetricFamily(
            "kvroute_requests", "Requests answered", labels=["endpoint", "status"]
        )
        for (endpoint, status), n in m.requests.items():
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        errors = CounterMetricFamily("kvroute_errors", "Errors by kind", labels=["kind"])
        for kind, n in m.errors.items():
            errors.add_metric([kind], n)
        yield errors
        outcomes = CounterMetricFamily(
            "kvroute_cache_outcomes", "Routing outcomes", labels=["backend", "outcome"]
        )
        for backend, counters in m.backends.items():
            for outcome, n in counters.outcomes.items():
                outcomes.add_metric([backend, outcome], n)
        yield outcomes
        tokens = CounterMetricFamily("kvroute_tokens", "Tokens relayed", labels=["kind"])
        for kind, n in m.tokens.items():
            tokens.add_metric([kind], n)
        yield tokens
        yield CounterMetricFamily("kvroute_retries", "Retries on another backend", value=m.retries)
        yield CounterMetricFamily(
            "kvroute_relayed_bytes", "Bytes sent to clients", value=m.bytes_out
        )
        yield CounterMetricFamily(
            "kvroute_client_disconnects", "Streams the client left", value=m.client_disconnects
        )
        yield CounterMetricFamily(
            "kvroute_ownership_fallbacks",
            "Ownership look-ups served from memory because Redis failed",
            value=self.ownership_fallbacks(),
        )
        ttft = SummaryMetricFamily("kvroute_ttft_seconds", "Time to first token (recent window)")
        ttft.add_metric([], count_value=len(m.ttft_ms), sum_value=sum(m.ttft_ms) / 1000.0)
        yield ttft
        for metric, per_backend in self.gauges().items():
            family = GaugeMetricFamily(
                f"kvroute_{metric}", f"Per-backend {metric}", labels=["backend"]
            )
            for backend, value in per_backend.items():
                family.add_metric([backend], value)
            yield family
