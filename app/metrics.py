"""The router's own counters: plain integers on the hot path, rendered on demand.

`RouterMetrics.snapshot()` gives the JSON for `/metrics`; `RouterMetrics.collector()` yields the same
figures as Prometheus families for `prometheus_client` (no global registry: one per app). Histograms
are fixed buckets per label set (`Histogram.observe`: one bisect, three additions), and the last
routing decisions are a bounded ring for the dashboard.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from app.percentile import percentiles

if TYPE_CHECKING:
    from app.tracing import RequestTrace

SAMPLE_WINDOW = 4096
RECENT_DECISIONS = 64
# Histogram buckets, in seconds (Prometheus `le`, inclusive upper bounds; +Inf is implied).
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
)  # fmt: skip
DURATION_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
GENERATION_ENDPOINTS = frozenset({"chat", "completions", "responses"})
# Label values shown where a request has none (bounded: never a tenant or a prefix key).
NO_LABEL = "none"


class Histogram:
    """Fixed-bucket histograms, one per label set; rendered cumulatively at scrape time."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # label values -> [count per bucket..., count above the last bound, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def family(self, name: str, doc: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, counts in sorted(self.series.items()):
            running = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(self.bounds, counts, strict=False):
                running += n
                buckets.append((repr(bound), running))
            buckets.append(("+Inf", running + counts[-2]))
            family.add_metric(list(labels), buckets, sum_value=counts[-1])
        return family


@dataclass(slots=True)
class RequestScope:
    """What is known of a request before its outcome; filled in as it goes (tenant, model)."""

    request_id: str
    started_s: float  # time.monotonic() at receipt
    trace: RequestTrace | None = None
    tenant: str | None = None
    model: str | None = None


class RecentDecision(NamedTuple):
    """One routing decision for the dashboard's ring: never the prompt, the tenant in clear only
    here in memory (the dashboard shows a keyed hash of it). A tuple: cheap to make per request."""

    time_s: float  # wall clock
    tenant: str | None
    model: str | None
    backend: str
    outcome: str | None
    affinity: str | None
    ttft_ms: float | None
    status: int


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
    scope: RequestScope | None = None
    duration_s: float | None = None  # receipt to last byte; set by `record` from the scope


class RouterMetrics:
    def __init__(self, on_record: Callable[[RequestRecord], None] | None = None) -> None:
        self.on_record = on_record  # the request log and trace; called once per request
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
        self.ttft_seen = 0  # TTFT samples ever taken (the dashboard reads the new ones per second)
        self.ttft_s = Histogram(TTFT_BUCKETS_S)
        self.tpot_s = Histogram(TPOT_BUCKETS_S)
        self.duration_s = Histogram(DURATION_BUCKETS_S)
        self.recent: deque[RecentDecision] = deque(maxlen=RECENT_DECISIONS)

    def record(self, rec: RequestRecord) -> None:
        scope = rec.scope
        if scope is not None and rec.duration_s is None:
            rec.duration_s = time.monotonic() - scope.started_s
        if rec.backend and rec.endpoint in GENERATION_ENDPOINTS:
            model = scope.model if scope is not None else None
            labels = (rec.backend, model or NO_LABEL, rec.outcome or NO_LABEL)
            if rec.ttft_ms is not None:
                self.ttft_s.observe(labels, rec.ttft_ms / 1000.0)
            if rec.tps:
                self.tpot_s.observe(labels, 1.0 / rec.tps)
            if rec.duration_s is not None:
                self.duration_s.observe(labels, rec.duration_s)
            self.recent.append(
                RecentDecision(
                    time.time(),
                    scope.tenant if scope is not None else None,
                    model,
                    rec.backend,
                    rec.outcome,
                    rec.affinity,
                    rec.ttft_ms,
                    rec.status,
                )
            )
        self._count(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def _count(self, rec: RequestRecord) -> None:
        self.requests[(rec.endpoint, rec.status)] += 1
        if rec.error_kind:
            self.errors[rec.error_kind] += 1
        if rec.stream:
            self.streams += 1
        self.retries += rec.retries
        self.bytes_out += rec.bytes_out
        if rec.ttft_ms is not None:
            self.ttft_ms.append(rec.ttft_ms)
            self.ttft_seen += 1
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
        ownership_fallbacks: Callable[[], Mapping[str, int]],
        rejections: Callable[[], Mapping[str, int]] | None = None,
    ) -> Collector:
        """Prometheus view. `gauges()` gives live per-backend gauges: {metric: {backend: value}};
        `rejections()` the admission rejections by reason."""
        return _PromCollector(self, gauges, ownership_fallbacks, rejections or dict)


# Help texts of the per-backend gauges `gauges()` may name; others get a generic one.
GAUGE_HELP = {
    "backend_in_flight": "Requests this router has in flight on the backend",
    "backend_healthy": "1 when the backend answers its health probe, else 0",
    "backend_serving": "1 when the backend takes new requests (state serving), else 0",
    "backend_owned_keys": "Conversation prefix keys the backend owns",
    "backend_waiting_requests": "Requests waiting in the backend's vLLM queue (its /metrics)",
    "backend_running_requests": "Requests running in the backend's vLLM engine (its /metrics)",
    "backend_kv_cache_usage_ratio": "Fraction of the backend's KV cache in use, 0..1 (its /metrics)",
    "backend_kv_retention_ratio": "Share of its conversations' earlier tokens the backend still "
    "held when they came back, 0..1 (measured from its answers' cached_tokens)",
    "backend_kv_cache_tokens": "The backend's KV cache size in tokens (vLLM's cache_config_info)",
}
HISTOGRAM_LABELS = ["backend", "model", "cache_outcome"]


class _PromCollector(Collector):
    def __init__(
        self,
        m: RouterMetrics,
        gauges: Callable[[], dict[str, dict[str, float]]],
        ownership_fallbacks: Callable[[], Mapping[str, int]],
        rejections: Callable[[], Mapping[str, int]],
    ) -> None:
        self.m = m
        self.gauges = gauges
        self.ownership_fallbacks = ownership_fallbacks
        self.rejections = rejections

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
        for name, outcome, doc in (
            ("kvroute_spills", "spill", "Requests sent past their owner (overloaded or costlier)"),
            ("kvroute_reassignments", "reassigned", "Requests whose owner was gone"),
        ):
            moved = CounterMetricFamily(
                name, doc + ", by the backend that took them", labels=["backend"]
            )
            for backend, counters in m.backends.items():
                moved.add_metric([backend], counters.outcomes[outcome])
            yield moved
        rejected = CounterMetricFamily(
            "kvroute_admission_rejections", "Requests refused by admission (429)", labels=["reason"]
        )
        for reason, n in self.rejections().items():
            rejected.add_metric([reason], n)
        yield rejected
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
        fallbacks = CounterMetricFamily(
            "kvroute_ownership_fallbacks",
            "Ownership look-ups served from memory because Redis failed, by cause "
            "(timeout, connection, cluster, other)",
            labels=["cause"],
        )
        for cause, n in self.ownership_fallbacks().items():
            fallbacks.add_metric([cause], n)
        yield fallbacks
        yield m.ttft_s.family(
            "kvroute_ttft_seconds",
            "Time to first token: router receipt to the first content chunk (streams)",
            HISTOGRAM_LABELS,
        )
        yield m.tpot_s.family(
            "kvroute_time_per_output_token_seconds",
            "Time per output token after the first (streams)",
            HISTOGRAM_LABELS,
        )
        yield m.duration_s.family(
            "kvroute_request_duration_seconds",
            "End-to-end duration: router receipt to the last byte",
            HISTOGRAM_LABELS,
        )
        for metric, per_backend in self.gauges().items():
            family = GaugeMetricFamily(
                f"kvroute_{metric}",
                GAUGE_HELP.get(metric, f"Per-backend {metric}"),
                labels=["backend"],
            )
            for backend, value in per_backend.items():
                family.add_metric([backend], value)
            yield family
