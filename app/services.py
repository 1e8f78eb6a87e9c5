"""The router's collaborators, built in one place from `Settings`, and their lifetime.

`build_services(settings)` wires the pool, stores, policies, admission, rates, metrics and the
upstream transport (tests pass a `MockTransport`); `running(services)` is the app's lifespan:
it opens the transport and owns every background task (probes, admission ticks, the Redis
writer, the dashboard series), cancelling and awaiting them at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from app.admission import Admission, Limits
from app.backends import BackendPool
from app.bodies import BodiesCollector, BodyBudget
from app.config import Settings, redact_url
from app.dashboard import SeriesRecorder, TenantTags
from app.fleet import Fleet, FleetCollector, RedisMembership
from app.http1 import HttpToolsTransport
from app.logs import RequestLog
from app.looplag import LoopLag
from app.metrics import RequestRecord, RouterMetrics
from app.ownership import MemoryStore, OwnershipStore, RedisStore
from app.presentation import prom_gauges
from app.rates import RateLimits, RatesCollector, RedisRateLimits
from app.redislink import WARM_CONNECTIONS, is_cluster, redis_client, warm
from app.resp import Links, links_for
from app.responses import MemoryResponses, RedisResponses, ResponseStore
from app.routing import CostWeights, LeastLoaded, Policy, make_policy
from app.security import KeyRing
from app.tenancy import Network, parse_networks
from app.tracing import Tracing, tracing_from_settings
from app.transport import AiohttpTransport, Transport
from app.upstream import Dispatcher

log = logging.getLogger("kvroute.services")


@dataclass(eq=False)
class Services:
    settings: Settings
    metrics: RouterMetrics
    request_log: RequestLog
    tracing: Tracing
    trusted: tuple[Network, ...]
    keyring: KeyRing
    pool: BackendPool
    store: OwnershipStore
    policy: Policy
    admission: Admission
    bodies: BodyBudget
    rates: RateLimits | RedisRateLimits
    transport: Transport
    lag: LoopLag  # this loop's backlog, run by `running`
    dispatcher: Dispatcher
    registry: CollectorRegistry
    series: SeriesRecorder
    fleet: Fleet
    tenant_tags: TenantTags = field(default_factory=TenantTags)
    passthrough_policy: Policy = field(default_factory=LeastLoaded)
    redis: Any = None  # redis.asyncio.Redis or RedisCluster when REDIS_URL is set
    links: Links | None = None  # the request path's Redis calls (`resp`)
    responses: ResponseStore = field(default_factory=lambda: MemoryResponses(86400, 86400))
    started_at: int = field(default_factory=lambda: int(time.time()))
    discovering: int = 0  # look-ups of unknown response ids running (`responses_path`)

    def ready_for(self, model: str) -> Callable[[], bool]:
        """Whether some routable backend serving `model` can take one more request now."""
        per_backend = self.settings.max_in_flight_per_backend
        max_waiting = self.settings.max_backend_waiting
        pool = self.pool

        def ready() -> bool:
            # `pool.backends` read at each call: a queued request sees backends added (or
            # drained) while it waits.
            return any(
                b.routable
                and model in b.models
                and b.in_flight < per_backend
                and (b.metrics is None or b.metrics.waiting <= max_waiting)
                for b in pool.backends
            )

        return ready

    def rejections(self) -> dict[str, int]:
        """Admission rejections by reason: queue limits, tenant rates (`rate_rpm`, ...) and the
        body budget (`bodies_full`)."""
        local = self.rates.local if isinstance(self.rates, RedisRateLimits) else self.rates
        rates = {f"rate_{kind}": n for kind, n in local.rejected.items()}
        bodies = {"bodies_full": self.bodies.refused} if self.bodies.refused else {}
        return {**self.admission.stats.rejected, **rates, **bodies}

    def ownership_fallbacks(self) -> dict[str, int]:
        """Look-ups served from memory instead of Redis, by cause."""
        if isinstance(self.store, RedisStore):
            return {cause: n for cause, n in self.store.fallback_causes.items()}
        return {}


def upstream_transport(s: Settings, lag: LoopLag | None = None) -> Transport:
    """The client the router reaches its backends with (`UPSTREAM_CLIENT`); the httptools one
    does not count `lag` (this loop's own backlog) against a backend's connect timeout."""
    if s.upstream_client == "httptools":
        return HttpToolsTransport(
            connect_timeout_s=s.connect_timeout_s,
            pool_idle_timeout_s=s.pool_idle_timeout_s,
            max_per_host=s.max_connections_per_backend,
            lag=lag,
        )
    return AiohttpTransport(
        connect_timeout_s=s.connect_timeout_s,
        pool_idle_timeout_s=s.pool_idle_timeout_s,
        max_per_host=s.max_connections_per_backend,
    )


def build_services(settings: Settings, *, transport: Transport | None = None) -> Services:
    s = settings
    redis = (
        redis_client(
            s.redis_url, s.redis_timeout_s, cluster=is_cluster(s.redis_url, s.redis_cluster)
        )
        if s.redis_url
        else None
    )
    lag = LoopLag()  # run for the app's lifetime; read by the deadlines of Redis and connects
    links = _lean_links(s, redis)
    store: OwnershipStore = (
        RedisStore(
            redis,
            s.redis_url,
            ttl_s=s.ownership_ttl_s,
            timeout_s=s.redis_timeout_s,
            retry_s=s.redis_retry_s,
            cache_s=s.ownership_cache_s,
            lag=lag,
            links=links,
        )
        if redis is not None
        else MemoryStore(s.ownership_ttl_s)
    )
    responses = _responses(s, redis, lag)

    async def on_restart(name: str, since_s: float) -> None:
        await store.forget_backend(name, since_s)
        await responses.forget_backend(pool.get(name).url, since_s)

    pool = BackendPool(
        s.backend_urls,
        default_model=s.served_model,
        default_api_key=s.backend_api_key,
        unhealthy_after_failures=s.unhealthy_after_failures,
        breaker_failures=s.breaker_failures,
        breaker_cooldown_s=s.breaker_cooldown_s,
        on_restart=on_restart,
    )
    if s.shared_load and isinstance(store, RedisStore):  # replicas share in-flight counts
        store.local_in_flight = lambda: {b.name: b.in_flight for b in pool.backends}
        store.on_peer_load = pool.share_peer_load
        pool.on_load_change = store.load_changed.set
    policy = make_policy(s.routing_policy, _weights(s), retention=s.kv_retention)
    transport = transport or upstream_transport(s, lag)
    request_log = RequestLog()
    tracing = tracing_from_settings(s)
    metrics = RouterMetrics(on_record=_observer(request_log))
    services = Services(
        settings=s,
        metrics=metrics,
        request_log=request_log,
        tracing=tracing,
        trusted=parse_networks(s.trusted_proxies),
        keyring=KeyRing(s.router_api_keys),
        pool=pool,
        store=store,
        policy=policy,
        admission=Admission(_limits(s)),
        bodies=BodyBudget(s.max_body_bytes_held),
        rates=_rates(s, redis, lag, links),
        transport=transport,
        lag=lag,
        dispatcher=Dispatcher(
            pool=pool,
            policy=policy,
            ownership=store,
            transport=transport,
            read_timeout_s=s.read_timeout_s,
            retries=s.retries,
            retry_budget_s=s.retry_budget_s,
            max_in_flight_per_backend=s.max_in_flight_per_backend,
        ),
        registry=CollectorRegistry(auto_describe=True),
        series=SeriesRecorder(metrics, pool),
        fleet=Fleet(
            pool,
            drain_timeout_s=s.drain_timeout_s,
            membership=RedisMembership(redis) if redis is not None else None,
            backends_file=s.backends_file,
            forget=store.forget_backend,
        ),
        redis=redis,
        links=links,
        responses=responses,
    )
    services.registry.register(FleetCollector(services.fleet))
    services.registry.register(BodiesCollector(services.bodies))
    services.registry.register(RatesCollector(services.rates))
    services.registry.register(
        metrics.collector(
            lambda: prom_gauges(pool, store), services.ownership_fallbacks, services.rejections
        )
    )
    return services


def _weights(s: Settings) -> CostWeights:
    return CostWeights(
        w_prefill=s.w_prefill,
        w_load=s.w_load,
        w_waiting=s.w_waiting,
        cap_factor=s.load_cap_factor,
        cap_floor=s.load_cap_floor,
    )


def _limits(s: Settings) -> Limits:
    return Limits(
        max_in_flight=s.max_in_flight,
        max_in_flight_per_tenant=s.max_in_flight_per_tenant,
        max_queue=s.max_queue,
        max_queue_per_tenant=s.max_queue_per_tenant,
        queue_timeout_s=s.queue_timeout_s,
    )


def _lean_links(s: Settings, redis: Any) -> Links | None:
    """The lean links for the request path's Redis calls (ownership look-ups, rate checks), when
    asked for and the client is one they can reproduce."""
    if redis is None or s.redis_lookup_client != "lean":
        return None
    links = links_for(redis)
    if links is None:  # said once, so that /metrics' `lookup_client` is no surprise
        log.info(
            "REDIS_LOOKUP_CLIENT=lean: %s needs redis-py (TLS or a credential provider); the "
            "request path's Redis calls use it",
            redact_url(s.redis_url),
        )
    return links


def _responses(s: Settings, redis: Any, lag: LoopLag) -> ResponseStore:
    if redis is None:
        return MemoryResponses(
            s.responses_owner_ttl_s,
            s.responses_history_ttl_s,
            history_max_bytes=s.responses_history_memory_bytes,
        )
    return RedisResponses(
        redis,
        s.redis_url,
        owner_ttl_s=s.responses_owner_ttl_s,
        history_ttl_s=s.responses_history_ttl_s,
        history_memory_bytes=s.responses_history_memory_bytes,
        # Correctness, not a routing hint: another replica must find the owner. So a slow Redis
        # is waited for longer than for prefix ownership.
        timeout_s=max(s.redis_timeout_s * 10, 0.5),
        retry_s=s.redis_retry_s,
        lag=lag,
    )


def _rates(
    s: Settings, redis: Any, lag: LoopLag, links: Links | None
) -> RateLimits | RedisRateLimits:
    if redis is None:
        return RateLimits(s.tenant_rpm, s.tenant_tpm)
    return RedisRateLimits(
        redis,
        s.tenant_rpm,
        s.tenant_tpm,
        timeout_s=max(s.redis_timeout_s, 0.05),
        lag=lag,
        links=links,
    )


def _observer(request_log: RequestLog) -> Callable[[RequestRecord], None]:
    def observed(rec: RequestRecord) -> None:
        """A request is over (called once, from `metrics.record`): its log line and trace."""
        request_log.emit(rec)
        if rec.scope is not None and rec.scope.trace is not None:
            rec.scope.trace.end(rec)

    return observed


@contextlib.asynccontextmanager
async def running(services: Services) -> AsyncIterator[None]:
    """The app's lifespan: the transport open, the background tasks running."""
    s = services.settings
    async with services.transport as transport:
        pool = services.pool
        warm_s = max(s.redis_timeout_s * 20, 1.0)  # what start-up waits for Redis, at most
        if services.redis is not None:
            await warm(services.redis, WARM_CONNECTIONS, warm_s)
        if services.links is not None:
            await services.links.warm(warm_s)
        await services.fleet.start()
        await pool.probe_health(transport, s.probe_timeout_s)
        await pool.probe_metrics(transport, s.probe_timeout_s)
        if not pool.any_healthy():
            log.warning("no backend is healthy yet; requests get 503 until one answers /health")
        loops = [
            pool.run_probes(
                transport,
                health_interval_s=s.health_interval_s,
                metrics_interval_s=s.metrics_interval_s,
                timeout_s=s.probe_timeout_s,
            ),
            services.lag.run(),
            services.admission.run(),
            services.store.run(),
            services.responses.run(),
            services.rates.run(),
            services.series.run(),
            services.fleet.run(),
        ]
        try:
            async with background(loops):
                yield
        finally:
            services.tracing.shutdown()
            if services.links is not None:
                await services.links.aclose()
            if services.redis is not None:
                await services.redis.aclose()


@contextlib.asynccontextmanager
async def background(loops: list[Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run `loops` as tasks for the body of the `async with`; cancel and await them after."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("background task failed: %r", result)
