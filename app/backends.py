"""The fleet: each vLLM backend's health, models, load, and what its `/metrics` says.

`parse_vllm_metrics(text)` is pure. `BackendPool` owns the mutable per-backend state; a decision
reads it through `candidates(model, ...)` (below), status pages through `snapshot()`, immutable
views. Load is counted by the dispatcher when it sends (`lease`), never by a probe.

The membership changes while the router runs (`add`, `drain`, `remove`): `backends` is a tuple
replaced on each change, never mutated, so whoever iterates it holds a consistent snapshot, and a
lease keeps its `Backend` object, so one taken on a backend removed meanwhile is released on it.
Each backend has a state: `probing` (added, not yet answering `/health` and `/v1/models`),
`serving`, `draining` (no new requests; removed once its open ones end) and `down`.

A decision does not look at every backend: `candidates(model, ...)` hands the policy the model's
`Roster` (app/candidates.py), cached until an epoch changes. The epoch is bumped by whatever
moves a backend in or out of a roster: membership, and a change of a backend's `healthy`,
`draining` or `models` however it is made (`Backend.__setattr__`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import orjson

from app.candidates import Candidates, Roster
from app.errors import UpstreamError
from app.transport import Transport, UpstreamResponse, read_all

BackendState = Literal["probing", "serving", "draining", "down"]

log = logging.getLogger("kvroute.backends")


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    start_time_s: float | None = None
    kv_tokens: int = 0  # KV cache size in tokens (cache_config_info: num_gpu_blocks x block_size)


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


_CACHE_INFO = "vllm:cache_config_info"
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def cache_tokens(line: str) -> int:
    """The KV cache size, in tokens, that a `vllm:cache_config_info` line's labels give."""
    labels = dict(_LABEL.findall(line[: line.rfind("}") + 1]))
    try:
        return max(int(labels["num_gpu_blocks"]) * int(labels["block_size"]), 0)
    except (KeyError, ValueError):
        return 0


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """Read the load signals out of vLLM's Prometheus text, summing over engines (data parallel)."""
    sums: dict[str, float] = {}
    kv_tokens = 0
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = len(line)
        for stop in ("{", " "):
            pos = line.find(stop)
            if 0 <= pos < name_end:
                name_end = pos
        name = line[:name_end]
        if name == _CACHE_INFO:
            kv_tokens += cache_tokens(line)
            continue
        field_name = _METRIC_FIELDS.get(name)
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
        kv_tokens=kv_tokens,
    )


# Weight of one answer in a backend's retention: about the last 20 answers to owned
# conversations count, so an evicting backend shows within a second under load.
RETENTION_WEIGHT = 0.05


def retained(retention: float, expected: int, cached: int) -> float:
    """The retention after one answer: moved toward the share of `expected` tokens found cached
    (vLLM caches whole blocks, so a backend that kept everything reads a little under 1). A
    figure out of range (a broken backend's) counts as none or all of it."""
    sample = min(max(cached / expected, 0.0), 1.0)
    return retention + RETENTION_WEIGHT * (sample - retention)


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
    # In flight there from the other router replicas (their shared counts while current, else 0):
    # it weighs in the load as this router's own do, as one process would count them all.
    peers: float = 0.0
    # Share of a conversation's earlier tokens the backend still held when the conversation came
    # back (measured, see `BackendPool.note_cached`); 1.0 until measured.
    retention: float = 1.0

    def serves(self, model: str) -> bool:
        return model in self.models


class Epoch:
    """A pool's counter of changes to who may be routed to; its backends share it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


# A change of one of these may move a backend in or out of a model's roster.
_ROSTER_FIELDS = frozenset({"healthy", "draining", "models"})


@dataclass(slots=True)
class Backend:
    name: str
    url: str
    healthy: bool = False
    models: frozenset[str] = frozenset()
    in_flight: int = 0  # changed by `BackendPool.lease`/`hold` only (they keep the rosters')
    failures: int = 0
    last_error: str = ""
    metrics: VllmMetrics | None = None
    scraped_s: float = 0.0  # when the scrape that got `metrics` was sent (pool clock)
    generation: int = 0  # bumped when vLLM restarts: its cache is gone
    dispatched: int = 0
    next_probe_s: float = 0.0
    live_failures: int = 0  # consecutive failed live requests (circuit breaker)
    breaker_until_s: float = 0.0
    capacity: int | None = None
    others: float = 0.0
    peers: float = 0.0  # the other replicas' in-flight requests here while their counts are current
    peers_until_s: float = 0.0  # `others` and `peers` hold the other replicas' counts until then
    retention: float = 1.0
    reports_cached: bool = False  # its answers were seen to carry usage's cached_tokens
    max_model_len: dict[str, int] = field(default_factory=dict)
    # Its own key (else BACKEND_API_KEY's) sent as its bearer; never shown.
    api_key: str = field(default="", repr=False)
    # Set once its /health and /v1/models first answered: `probing` until then.
    admitted: bool = False
    draining: bool = False
    cut: bool = False  # removed from the pool
    # Upstream responses held on it now: cutting the backend closes them.
    responses: dict[int, UpstreamResponse] = field(default_factory=dict)  # by id()
    idle: asyncio.Event | None = None  # a drain waits on it: set when in_flight comes to 0
    epoch: Epoch = field(default_factory=Epoch, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        # (In __init__ the slot is still empty: getattr answers `value`, nothing is bumped.)
        if name in _ROSTER_FIELDS and getattr(self, name, value) != value:
            self.epoch.value += 1
        object.__setattr__(self, name, value)

    @property
    def waiting(self) -> float:
        """vLLM's waiting count at the last scrape."""
        return (self.metrics or NO_METRICS).waiting

    @property
    def kv_tokens(self) -> int:
        """Its KV cache size in tokens at the last scrape (0: unknown)."""
        return (self.metrics or NO_METRICS).kv_tokens

    @property
    def state(self) -> BackendState:
        if self.draining:
            return "draining"
        if not self.admitted:
            return "probing"
        return "serving" if self.healthy else "down"

    @property
    def routable(self) -> bool:
        """Whether new requests may go to it."""
        return self.healthy and not self.draining

    def view(self) -> BackendView:
        metrics = self.metrics or NO_METRICS
        return BackendView(
            name=self.name,
            url=self.url,
            healthy=self.routable,
            models=self.models,
            in_flight=self.in_flight,
            waiting=metrics.waiting,
            running=metrics.running,
            kv_usage=metrics.kv_usage,
            capacity=self.capacity,
            others=self.others,
            peers=self.peers,
            retention=self.retention,
        )


class BackendPool:
    """Per-backend state plus the background probes that keep it current."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        default_model: str = "",
        default_api_key: str = "",
        unhealthy_after_failures: int = 2,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        # (name, seconds since its old process was last seen running) on a restart.
        on_restart: Callable[[str, float], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends: tuple[Backend, ...] = ()
        self._by_name: dict[str, Backend] = {}
        self._next_index = 0
        self._default_models = frozenset({default_model}) if default_model else frozenset()
        self._default_api_key = default_api_key
        self._unhealthy_after = unhealthy_after_failures
        self._breaker_failures = breaker_failures
        self._breaker_cooldown_s = breaker_cooldown_s
        self._on_restart = on_restart
        self.on_load_change: Callable[[], None] | None = None  # after every lease and release
        self._clock = clock
        self._probe_soon = asyncio.Event()  # a backend was added: probe it now, not later
        self._epoch = Epoch()
        self._rosters: dict[str, Roster] = {}  # by model, as of `_rosters_epoch`
        self._rosters_epoch = -1
        for url in urls:
            self.add(url)

    def get(self, name: str) -> Backend:
        return self._by_name[name]

    def find(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def by_url(self, url: str) -> Backend | None:
        return next((b for b in self.backends if b.url == url), None)

    # --- membership ----------------------------------------------------------------------
    def next_name(self, taken: Iterable[str] = ()) -> str:
        """The next free `bN`: never one used before in this process (its counters and
        ownership records belong to the old backend), nor one in `taken`."""
        used = set(taken) | set(self._by_name)
        while f"b{self._next_index}" in used:
            self._next_index += 1
        return f"b{self._next_index}"

    def add(self, url: str, *, name: str | None = None, api_key: str = "") -> Backend:
        """A new backend in state `probing`; ValueError when its URL or name is present."""
        url = url.rstrip("/")
        if self.by_url(url) is not None:
            raise ValueError(f"{url} is already in the pool")
        name = name or self.next_name()
        if name in self._by_name:
            raise ValueError(f"a backend named {name!r} is already in the pool")
        backend = Backend(
            name=name, url=url, models=self._default_models, api_key=api_key, epoch=self._epoch
        )
        self._replace((*self.backends, backend))
        self._probe_soon.set()
        if name[:1] == "b" and name[1:].isdigit():  # a given `bN`: never handed out again
            self._next_index = max(self._next_index, int(name[1:]) + 1)
        return backend

    def drain(self, name: str) -> Backend:
        backend = self._by_name[name]
        backend.draining = True
        return backend

    def remove(self, name: str) -> Backend | None:
        """Out of the pool; its open responses are closed (their streams end with an error
        event). A drained backend has none left."""
        backend = self._by_name.get(name)
        if backend is None:
            return None
        self._replace(tuple(b for b in self.backends if b.name != name))
        backend.cut = True
        for response in list(backend.responses.values()):
            response.close()
        return backend

    def _replace(self, backends: tuple[Backend, ...]) -> None:
        self.backends = backends
        self._by_name = {b.name: b for b in backends}
        self._epoch.value += 1

    def share_peer_load(self, counts: Mapping[str, float], fresh_s: float) -> None:
        """The other router replicas' in-flight counts, just read from Redis: for `fresh_s` they
        stand for `others` instead of the last vLLM scrape (older, and blind between scrapes)."""
        until = self._clock() + fresh_s
        for backend in self.backends:
            backend.others = backend.peers = counts.get(backend.name, 0.0)
            backend.peers_until_s = until

    def snapshot(self) -> tuple[BackendView, ...]:
        """Every backend as an immutable view (for status pages; a decision uses `candidates`)."""
        return tuple(b.view() for b in self.backends)

    def roster(self, model: str) -> Roster:
        """The routable backends serving `model`: rebuilt only after the epoch moved."""
        if self._rosters_epoch != self._epoch.value:
            self._rosters.clear()
            self._rosters_epoch = self._epoch.value
        roster = self._rosters.get(model)
        if roster is None:
            roster = Roster(b for b in self.backends if b.routable and model in b.models)
            if roster.members:  # (an unknown model, one a client made up, is not kept)
                self._rosters[model] = roster
        return roster

    def candidates(
        self, model: str, exclude: frozenset[str] = frozenset(), max_in_flight: int = 0
    ) -> Candidates:
        """Where a request for `model` may go: its roster less `exclude` and the backends at
        `max_in_flight` (0: no limit)."""
        return Candidates(self.roster(model), exclude, max_in_flight)

    def models(self) -> dict[str, int | None]:
        """Models served by routable backends, with the smallest max_model_len reported."""
        served: dict[str, int | None] = {}
        for backend in self.backends:
            if not backend.routable:
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
        return any(b.routable for b in self.backends)

    # --- load accounting (held around every upstream request) ----------------------------
    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Backend]:
        """One in-flight request on the backend for the body of the `with`."""
        backend = self._by_name[name]
        backend.dispatched += 1
        self._add(backend, 1)
        try:
            yield backend
        finally:
            self._add(backend, -1)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[Backend]:
        """One request counted in flight on the backend but not dispatched (no `dispatched`):
        a first home proposed while the request's look-up runs (`Dispatcher.first_home`), so
        that the next proposals of a burst see it, as they see a dispatched request."""
        backend = self._by_name[name]
        self._add(backend, 1)
        try:
            yield backend
        finally:
            self._add(backend, -1)

    def _add(self, backend: Backend, delta: int) -> None:
        backend.in_flight += delta
        self._count(backend, delta)
        if self.on_load_change is not None:
            self.on_load_change()
        if delta < 0 and backend.idle is not None and not backend.in_flight:
            backend.idle.set()

    def _count(self, backend: Backend, delta: int) -> None:
        """Keep each roster's in-flight total in step with its members' (a stale roster, left
        from an older epoch, is rebuilt from the members before it is used again)."""
        for roster in self._rosters.values():
            if roster.holds(backend):
                roster.in_flight += delta

    def note_cached(self, name: str, expected: int, cached: int | None) -> None:
        """An answer from `name` to a conversation it owns: `expected` tokens it had seen of the
        conversation, `cached` what it reported finding in its prefix cache (None: its usage
        had no cached_tokens). Updates the backend's measured retention."""
        backend = self._by_name.get(name)
        if backend is None or expected <= 0:
            return
        if cached is not None:
            backend.reports_cached = True
        elif not backend.reports_cached:
            return  # vLLM without --enable-prompt-tokens-details: nothing to learn
        backend.retention = retained(backend.retention, expected, cached or 0)

    def mark_failed(self, name: str, reason: str) -> None:
        """A live request could not reach the backend: suspect it at once, probe it soon."""
        backend = self._by_name.get(name)
        if backend is None:  # removed meanwhile
            return
        backend.failures = max(backend.failures + 1, self._unhealthy_after)
        backend.healthy = False
        backend.last_error = reason
        backend.next_probe_s = 0.0

    def record_failure(self, name: str, reason: str) -> None:
        """A live request failed with a retryable status; enough in a row open the breaker."""
        backend = self._by_name.get(name)
        if backend is None:
            return
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
        backend = self._by_name.get(name)
        if backend is not None:
            backend.live_failures = 0

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
                auth = self._auth(backend)
                status, data = await _get(transport, f"{backend.url}/v1/models", timeout_s, auth)
                if status == 200:
                    self._set_models(backend, orjson.loads(data))
                elif status >= 500:  # (a 401 is an answer: the clients' keys may be vLLM's)
                    ok, reason = False, f"/v1/models answered {status}"
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
            backend.admitted = True
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

    def _auth(self, backend: Backend) -> dict[str, str]:
        """Its own key, else BACKEND_API_KEY (vLLM's --api-key guards /v1/models, /metrics)."""
        key = backend.api_key or self._default_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def probe_metrics(self, transport: Transport, timeout_s: float) -> None:
        await asyncio.gather(*(self._scrape_one(transport, b, timeout_s) for b in self.backends))

    async def _scrape_one(self, transport: Transport, backend: Backend, timeout_s: float) -> None:
        if not backend.healthy:
            return
        sent_s = self._clock()
        try:
            status, data = await _get(
                transport, f"{backend.url}/metrics", timeout_s, self._auth(backend)
            )
        except UpstreamError:
            return
        if status != 200:
            return
        metrics = parse_vllm_metrics(data.decode("utf-8", "replace"))
        if is_restart(backend.metrics, metrics):
            backend.generation += 1
            backend.capacity = None
            backend.retention, backend.reports_cached = 1.0, False
            log.warning("backend %s restarted: its KV cache is empty", backend.name)
            if self._on_restart is not None:
                # The old process answered the scrape sent at `scraped_s`: it restarted since.
                await self._on_restart(backend.name, self._clock() - backend.scraped_s)
        backend.metrics, backend.scraped_s = metrics, sent_s
        if self._clock() >= backend.peers_until_s:  # no current counts from the other replicas
            backend.others = max(0.0, metrics.running + metrics.waiting - backend.in_flight)
            backend.peers = 0.0
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
        """Background loop: health every `health_interval_s` (a new backend at once), metrics
        every `metrics_interval_s`."""
        while True:
            self._probe_soon.clear()
            try:
                # Only the backends due are probed (each has its next time).
                await self.probe_health(transport, timeout_s, health_interval_s)
                await self.probe_metrics(transport, timeout_s)
            except Exception:  # the loop's outer boundary: a bug here must not stop the probes
                log.exception("backend probes failed; retrying")
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that
            # comes as the event is set, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(metrics_interval_s):
                    await self._probe_soon.wait()


# A probe answer larger than this is not vLLM's (its /metrics is tens of KB).
PROBE_MAX_BYTES = 8 << 20


async def _get(
    transport: Transport, url: str, timeout_s: float, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    response = await transport.request(
        "GET", url, None, headers or {}, read_timeout_s=timeout_s, total_timeout_s=timeout_s
    )
    try:
        return response.status, await read_all(response, PROBE_MAX_BYTES)
    finally:
        response.close()
