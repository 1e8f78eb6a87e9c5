"""The router's one Redis connection (a single node or a Redis Cluster), the names of its failures,
and a deadline that measures Redis rather than this process's own event loop.

Ownership and rate limits share one client per process. Every script's keys carry one hash tag,
so the same code runs on a single node and on a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import urlsplit

from app.config import redact_url
from app.looplag import LoopLag, lag_deadline

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

log = logging.getLogger("kvroute.redis")

FallbackCause = Literal["timeout", "connection", "cluster", "other"]
FALLBACK_CAUSES: tuple[FallbackCause, ...] = ("timeout", "connection", "cluster", "other")

# Connections per Redis node. redis-py refuses a command past its pool's limit
# (MaxConnectionsError, 100 by default): a fallback for want of a socket, not Redis's fault. A
# single node's pool makes a look-up wait for a free connection instead (within its deadline);
# the cluster client cannot wait, so its limit is well above any router's concurrency.
MAX_CONNECTIONS = 256
CLUSTER_MAX_CONNECTIONS = 4096


def wall_cap_s(timeout_s: float) -> float:
    """How long a call may take whatever our loop does: a slow Redis behind a saturated loop
    still gives up after this much wall time (the cap of `redis_deadline`)."""
    return max(timeout_s * 40, 2.0)


def redis_client(url: str, timeout_s: float, *, cluster: bool = False) -> Redis | RedisCluster:
    """One client (and connection pool) per router process, shared by ownership and rate limits.

    The socket timeouts only bound a hung connection; each call has its own deadline, which
    forgives our loop's lag. redis-py's count wall time: at 0.5 s, a loop stalled while look-ups
    opened connections made a healthy Redis a fallback (8 in one c=256 run); at the deadline's
    wall-time cap they never fire first."""
    from redis.maint_notifications import MaintNotificationsConfig

    bound = wall_cap_s(timeout_s)
    # Maintenance notifications (a managed-service feature) cost a command per new connection,
    # and their set-up is where a cluster connection dropped mid-failover broke (see
    # `redis_trouble`).
    quiet = MaintNotificationsConfig(enabled=False)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            url,
            socket_timeout=bound,
            socket_connect_timeout=bound,
            max_connections=CLUSTER_MAX_CONNECTIONS,
            maint_notifications_config=quiet,
        )
    import redis.asyncio as redis_asyncio

    pool = redis_asyncio.BlockingConnectionPool.from_url(
        url,
        socket_timeout=bound,
        socket_connect_timeout=bound,
        max_connections=MAX_CONNECTIONS,
        timeout=None,  # the wait for a connection is bounded by each call's deadline
        maint_notifications_config=quiet,
    )
    return redis_asyncio.Redis.from_pool(pool)


# Connections opened at start-up: a burst of requests right after a (re)start would otherwise
# open them itself, each with its own connect and handshake, all behind one another on the loop
# (32 look-ups at once: 38 ms cold against 5-7 ms warm, here).
WARM_CONNECTIONS = 32


async def warm(redis: Redis | RedisCluster, connections: int, timeout_s: float) -> int:
    """Open up to `connections` pooled connections at once (a PING each, concurrent, so each
    takes its own); how many answered. A Redis that does not answer is left to the first
    requests' fallback: start-up neither fails nor waits past `timeout_s` for it."""
    try:
        async with asyncio.timeout(timeout_s):
            answers = await asyncio.gather(
                *(redis.ping() for _ in range(connections)), return_exceptions=True
            )
    except TimeoutError:
        return 0
    return sum(1 for answer in answers if not isinstance(answer, BaseException))


def is_cluster(url: str, mode: str, *, timeout_s: float = 1.0) -> bool:
    """Whether `url` is a Redis Cluster: `mode` true/false decides, `auto` asks the server once
    (`INFO cluster`). A server that does not answer at start-up is taken for a single node."""
    if mode != "auto":
        return mode == "true"
    import redis

    if urlsplit(url).scheme == "unix":
        return False  # a cluster is never reached through a unix socket
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        info = client.info("cluster")
    except redis_trouble() as exc:
        log.warning(
            "Redis at %s did not answer INFO cluster (%s): taken for a single node; set "
            "REDIS_CLUSTER=true if it is a cluster",
            redact_url(url),
            exc,
        )
        return False
    finally:
        client.close()
    return bool(info.get("cluster_enabled"))


def redis_trouble() -> tuple[type[BaseException], ...]:
    """What Redis failing looks like from here: its own errors (the cluster client's too), a socket
    error, our deadline. (redis is imported only when it is used: it pulls in OpenTelemetry.)"""
    from redis.exceptions import RedisClusterException, RedisError

    # AttributeError, RuntimeError: when a master dies, redis-py 8's cluster client can write on
    # a connection another task has just closed ("'NoneType' object has no attribute
    # 'writelines'"; uvloop: "unable to perform operation on <TCPTransport closed=True>").
    return (RedisError, RedisClusterException, OSError, TimeoutError, AttributeError, RuntimeError)


def fallback_cause(exc: BaseException) -> FallbackCause:
    """The cause a Redis failure is counted under."""
    from redis import exceptions as rex

    if isinstance(exc, (TimeoutError, rex.TimeoutError)):
        return "timeout"
    cluster_errors = (
        rex.ClusterError,
        rex.AskError,  # and MovedError
        rex.TryAgainError,
        rex.ClusterCrossSlotError,
        rex.RedisClusterException,
    )
    if isinstance(exc, cluster_errors):
        return "cluster"
    if isinstance(exc, rex.ResponseError) and str(exc).split(" ", 1)[0] in (
        "MOVED",
        "ASK",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "CROSSSLOT",
    ):
        return "cluster"
    if isinstance(exc, (rex.ConnectionError, OSError)):
        return "connection"
    return "other"


@contextlib.asynccontextmanager
async def cancellation_kept() -> AsyncIterator[None]:
    """Raise the cancellation that reached the body without ending it (`async with`, or as a
    decorator of a coroutine function that calls Redis).

    redis-py sends every command under `asyncio.wait_for`, which on Python 3.11 returns the
    send's result instead of raising when the task is cancelled as the send completes (CPython
    gh-86296, fixed in 3.12): here 1490 of 2000 commands cancelled at random times ran on. The
    task then goes on with its cancel request pending and nobody left to deliver it: a request
    whose client left would still be sent to a backend, a background loop would never stop."""
    task = asyncio.current_task()
    pending = task.cancelling() if task is not None else 0
    try:
        yield
    except Exception as exc:  # a Redis error after the swallowed cancel: the cancel wins
        if task is not None and task.cancelling() > pending:
            raise asyncio.CancelledError from exc
        raise
    if task is not None and task.cancelling() > pending:
        raise asyncio.CancelledError


@contextlib.asynccontextmanager
async def redis_deadline(budget_s: float, lag: LoopLag, cap_s: float) -> AsyncIterator[None]:
    """`lag_deadline` for a Redis call: TimeoutError once Redis has had `budget_s` of a responsive
    loop without answering, or after `cap_s` of wall time; a cancellation redis-py swallowed is
    raised on the way out (`cancellation_kept`)."""
    async with cancellation_kept(), lag_deadline(budget_s, lag, cap_s):
        yield


T = TypeVar("T")


async def next_batch(queue: asyncio.Queue[T], most: int) -> list[T]:
    """A background writer's next batch: waits for one item, then takes what else is queued,
    up to `most`, so that one pipelined round trip carries them all."""
    batch = [await queue.get()]
    while not queue.empty() and len(batch) < most:
        batch.append(queue.get_nowait())
    return batch


def writer_deadline(
    timeout_s: float, lag: LoopLag, cap_s: float
) -> AbstractAsyncContextManager[None]:
    """The deadline of a background writer's batch: ten look-ups' worth (at least 1 s) of a
    responsive loop, and at least twice that of wall time."""
    budget_s = max(timeout_s * 10, 1.0)
    return redis_deadline(budget_s, lag, max(cap_s, budget_s * 2))
