"""The fleet: each vLLM backend's health, models, load, and what its `/metrics` says.

`parse_vllm_metrics(text)` is pure. `BackendPool` owns the mutable per-backend state; the router
reads it through `snapshot()`, an immutable view per request. Load is counted by the proxy when it
dispatches (`acquire`/`release`), never by a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import orjson

from app.errors import UpstreamError
from app.transport import Transport, read_all

log = logging.getLogger("kvroute.backends")


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    start_time_s: float | None = None


# Gauges and counters we read. Newer vLLM names first; `gpu_` names are the pre-0.10 spelling.
_METRIC_FIELDS: dict[str, str] = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage_old",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:gpu_prefix_cache_queries_total": "prefix_queries_old",
    "vllm:gpu_prefix_cache_hits_total": "prefix_hits_old",
    "process_start_time_seconds": "start_time_s",
}


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """Read the load signals out of vLLM's Prometheus text, summing over engines (data parallel)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = len(line)
        for stop in ("{", " "):
            pos = line.find(stop)
            if 0 <= pos < name_end:
                name_end = pos
        field_name = _METRIC_FIELDS.get(line[:name_end])
        if field_name is None:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if field_name == "start_time_s":
            sums[field_name] = value
        else:
            sums[field_name] = sums.get(field_name, 0.0) + value
    return VllmMetrics(
        running=sums.get("running", 0.0),
        waiting=sums.get("waiting", 0.0),
        kv_usage=sums.get("kv_usage", sums.get("kv_usage_old", 0.0)),
        prefix_queries=sums.get("prefix_queries", sums.get("prefix_queries_old", 0.0)),
        prefix_hits=sums.get("prefix_hits", sums.get("prefix_hits_old", 0.0)),
        start_time_s=sums.get("start_time_s"),
    )


def is_restart(before: VllmMetrics | None, after: VllmMetrics) -> bool:
    """vLLM restarted (so its KV cache is empty) when its start time moved or counters went back."""
    if before is None:
        return False
    started = (before.start_time_s, after.start_time_s)
    if None not in started and started[0] != started[1]:
        return True
    return after.prefix_queries < before.prefix_queries


NO_METRICS = VllmMetrics()  # before the first scrape (shared: building one per view costs µs)


@dataclass(frozen=True, slots=True)
class BackendView:
    """One backend as a routing decision sees it."""

    name: str
    url: str
    healthy: bool
    models: frozenset[str]
    in_flight: int
    waiting: float
    running: float
    kv_usage: float
    # Requests vLLM runs at once when saturated (learned: `running` while `waiting` > 0);
    # None until the backend has been seen queueing.
    capacity: int | None = None
    # Requests vLLM held at the last scrape beyond this router's own (other replicas, direct
    # clients): sampled, so it lags, but this router's own share is counted exactly.
    others: float = 0.0

    def serves(self, model: str) -> bool:
        return model in self.models


@dataclass(slots=True)
class Backend:
    name: str
    url: str
    healthy: bool = False
    models: frozenset[str] = frozenset()
    in_flight: int = 0
    failures: int = 0
    last_error: str = ""
    metrics: VllmMetrics | None = None
    generation: int = 0  # bumped when vLLM restarts: its cache is gone
    dispatched: int = 0
    next_probe_s: float = 0.0
    live_failures: int = 0  # consecutive failed live requests (circuit breaker)
    breaker_until_s: float = 0.0
    capacity: int | None = None
    others: float = 0.0
    peers_until_s: float = 0.0  # `others` holds the other replicas' shared counts until then
    max_model_len: dict[str, int] = field(default_factory=dict)

    def view(self) -> BackendView:
        metrics = self.metrics or NO_METRICS
        return BackendView(
            name=self.name,
            url=self.url,
            healthy=self.healthy,
            models=self.models,
            in_flight=self.in_flight,
            waiting=metrics.waiting,
            running=metrics.running,
            kv_usage=metrics.kv_usage,
            capacity=self.capacity,
            others=self.others,
        )


class BackendPool:
    """Per-backend state plus the background probes that keep it current."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        default_model: str = "",
        unhealthy_after_failures: int = 2,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        on_restart: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = [Backend(name=f"b{i}", url=url) for i, url in enumerate(urls)]
        self._by_name = {b.name: b for b in self.backends}
        self._default_models = frozenset({default_model}) if default_model else frozenset()
        self._unhealthy_after = unhealthy_after_failures
        self._breaker_failures = breaker_failures
        self._breaker_cooldown_s = breaker_cooldown_s
        self._on_restart = on_restart
        self._clock = clock
        for backend in self.backends:
            backend.models = self._default_models

    def get(self, name: str) -> Backend:
        return self._by_name[name]

    def share_peer_load(self, counts: Mapping[str, float], fresh_s: float) -> None:
        """The other router replicas' in-flight counts, just read from Redis: for `fresh_s` they
        stand for `others` instead of the last vLLM scrape (older, and blind between scrapes)."""
        until = self._clock() + fresh_s
        for backend in self.backends:
            backend.others = counts.get(backend.name, 0.0)
            backend.peers_until_s = until

    def snapshot(self) -> tuple[BackendView, ...]:
        return tuple(b.view() for b in self.backends)

    def models(self) -> dict[str, int | None]:
        """Models served by healthy backends, with the smallest max_model_len reported."""
        served: dict[str, int | None] = {}
        for backend in self.backends:
            if not backend.healthy:
                continue
            for model in backend.models:
                known = served.get(model)
                length = backend.max_model_len.get(model)
                if length is not None and (known is None or length < known):
                    served[model] = length
                else:
                    served.setdefault(model, known)
        return served

    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    # --- load accounting (held around every upstream request) ----------------------------
    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Backend]:
        """One in-flight request on the backend for the body of the `with`."""
        backend = self._by_name[name]
        backend.in_flight += 1
        backend.dispatched += 1
        try:
            yield backend
        finally:
            backend.in_flight -= 1

    def mark_failed(self, name: str, reason: str) -> None:
        """A live request could not reach the backend: suspect it at once, probe it soon."""
        backend = self._by_name[name]
        backend.failures = max(backend.failures + 1, self._unhealthy_after)
        backend.healthy = False
        backend.last_error = reason
        backend.next_probe_s = 0.0

    def record_failure(self, name: str, reason: str) -> None:
        """A live request failed with a retryable status; enough in a row open the breaker."""
        backend = self._by_name[name]
        backend.live_failures += 1
        backend.last_error = reason
        if backend.live_failures >= self._breaker_failures and backend.healthy:
            log.warning(
                "backend %s failed %d requests in a row (%s): skipped for at least %.0f s",
                name,
                backend.live_failures,
                reason,
                self._breaker_cooldown_s,
            )
            backend.healthy = False
            backend.breaker_until_s = self._clock() + self._breaker_cooldown_s

    def record_success(self, name: str) -> None:
        self._by_name[name].live_failures = 0

    # --- probes --------------------------------------------------------------------------
    async def probe_health(
        self, transport: Transport, timeout_s: float, interval_s: float = 0.0
    ) -> None:
        now = self._clock()
        due = [b for b in self.backends if b.next_probe_s <= now]
        await asyncio.gather(*(self._probe_one(transport, b, timeout_s) for b in due))
        for backend in due:
            # A down backend is probed less often (up to 4x the interval), an up one every time.
            backoff = 1 if backend.healthy else min(2 ** max(backend.failures - 1, 0), 4)
            backend.next_probe_s = now + interval_s * backoff - 0.01

    async def _probe_one(self, transport: Transport, backend: Backend, timeout_s: float) -> None:
        try:
            status, _ = await _get(transport, f"{backend.url}/health", timeout_s)
            ok = status == 200
            reason = "" if ok else f"/health answered {status}"
            if ok:
                status, data = await _get(transport, f"{backend.url}/v1/models", timeout_s)
                if status == 200:
                    self._set_models(backend, orjson.loads(data))
        except (UpstreamError, orjson.JSONDecodeError) as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if ok and backend.breaker_until_s > self._clock():
            ok, reason = False, "circuit breaker open after failed requests"
        if ok:
            # live_failures stays: after the cool-down one more failed request re-opens the
            # breaker at once (half-open), one success closes it.
            if not backend.healthy:
                log.info("backend %s (%s) is healthy", backend.name, backend.url)
            backend.healthy, backend.failures, backend.last_error = True, 0, ""
            return
        backend.failures += 1
        backend.last_error = reason
        if backend.failures >= self._unhealthy_after and backend.healthy:
            log.warning("backend %s (%s) is down: %s", backend.name, backend.url, reason)
            backend.healthy = False

    def _set_models(self, backend: Backend, payload: object) -> None:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return
        models: set[str] = set()
        lengths: dict[str, int] = {}
        for card in data:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                models.add(card["id"])
                if isinstance(card.get("max_model_len"), int):
                    lengths[card["id"]] = card["max_model_len"]
        if models:
            backend.models = frozenset(models)
            backend.max_model_len = lengths

    async def probe_metrics(self, transport: Transport, timeout_s: float) -> None:
        await asyncio.gather(*(self._scrape_one(transport, b, timeout_s) for b in self.backends))

    async def _scrape_one(self, transport: Transport, backend: Backend, timeout_s: float) -> None:
        if not backend.healthy:
            return
        try:
            status, data = await _get(transport, f"{backend.url}/metrics", timeout_s)
        except UpstreamError:
            return
        if status != 200:
            return
        metrics = parse_vllm_metrics(data.decode("utf-8", "replace"))
        if is_restart(backend.metrics, metrics):
            backend.generation += 1
            backend.capacity = None
            log.warning("backend %s restarted: its KV cache is empty", backend.name)
            if self._on_restart is not None:
                await self._on_restart(backend.name)
        backend.metrics = metrics
        if self._clock() >= backend.peers_until_s:  # no current counts from the other replicas
            backend.others = max(0.0, metrics.running + metrics.waiting - backend.in_flight)
        if metrics.waiting > 0 and metrics.running >= 1:
            # Queueing: what runs now is (about) all it can run at once.
            backend.capacity = max(backend.capacity or 0, int(metrics.running))

    async def run_probes(
        self,
        transport: Transport,
        *,
        health_interval_s: float,
        metrics_interval_s: float,
        timeout_s: float,
    ) -> None:
        """Background loop: health every `health_interval_s`, metrics every `metrics_interval_s`."""
        next_health = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_health:
                    await self.probe_health(transport, timeout_s, health_interval_s)
                    next_health = now + health_interval_s
                await self.probe_metrics(transport, timeout_s)
            except Exception:  # the loop's outer boundary: a bug here must not stop the probes
                log.exception("backend probes failed; retrying")
            await asyncio.sleep(metrics_interval_s)


# A probe answer larger than this is not vLLM's (its /metrics is tens of KB).
PROBE_MAX_BYTES = 8 << 20


async def _get(transport: Transport, url: str, timeout_s: float) -> tuple[int, bytes]:
    response = await transport.request(
        "GET", url, None, {}, read_timeout_s=timeout_s, total_timeout_s=timeout_s
    )
    try:
        return response.status, await read_all(response, PROBE_MAX_BYTES)
    finally:
        response.close()
