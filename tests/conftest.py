"""Shared fixtures: the router as a real server on a loopback port, in front of simulators."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from app.api import create_app
from app.config import Settings
from app.listener import protocol_for
from app.looplag import LoopLag
from app.services import background
from app.simulator.config import SimConfig
from harness.asgi import ThreadedServer, uvicorn_server
from harness.redis import PrivateRedis, PrivateRedisCluster
from harness.simulator import SimulatorThread


class RouterServer(ThreadedServer):
    """The router app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # The listener as `kvroute serve` runs it: httptools with the header limits.
        super().__init__(uvicorn_server(self.app, http=protocol_for(settings)))

    @property
    def router(self) -> Any:
        """The app's collaborators (`Services`): pool, metrics, admission, store..."""
        return self.app.services


@contextmanager
def running_router(backend_urls: list[str], **overrides: Any) -> Iterator[RouterServer]:
    params: dict[str, Any] = {
        "backend_urls": backend_urls,
        "health_interval_s": 0.2,
        "metrics_interval_s": 0.2,
        "_env_file": None,
    }
    params.update(overrides)
    server = RouterServer(Settings(**params)).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_simulators(n: int, **config: Any) -> Iterator[list[SimulatorThread]]:
    sims = [SimulatorThread(SimConfig(**{"model": "sim-model", **config})) for _ in range(n)]
    try:
        for sim in sims:
            sim.start()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def missing_service(reason: str) -> None:
    """A service a test needs is absent: a failure in CI (KVROUTE_REQUIRE_SERVICES=1), else a skip."""
    if os.environ.get("KVROUTE_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def private_redis(*extra: str) -> PrivateRedis:
    """A redis-server of the test's own, started (`extra`: its arguments); the caller stops it."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    return PrivateRedis(extra=extra).start()


def wait_for(condition: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@pytest.fixture
def sims() -> Iterator[list[SimulatorThread]]:
    with running_simulators(
        3, base_ttft_s=0.001, prefill_s_per_token=0.0, decode_tokens_per_s=2000.0
    ) as s:
        yield s


@pytest.fixture
def router(sims: list[SimulatorThread]) -> Iterator[RouterServer]:
    with running_router([s.url for s in sims], served_model="sim-model") as r:
        yield r


REDIS_URL = os.environ.get("KVROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


async def moment(delay_s: float) -> None:
    """Wait `delay_s`, one loop turn at a time. `asyncio.sleep` of under a millisecond wakes
    only when something else wakes the loop (epoll's timeout is whole milliseconds): a reply
    from a local Redis then lands in the same turn and is handled first, so a cancel almost never
    came mid-call (5 % of tries on the lean client, where the helper needed 5 % to pass)."""
    deadline = time.perf_counter() + delay_s
    await asyncio.sleep(0)  # the call starts
    while time.perf_counter() < deadline:  # noqa: ASYNC110 (a moment, not an event)
        await asyncio.sleep(0)


async def cancel_midway(
    start: Callable[[], Awaitable[object]],
    times: int,
    *,
    within_s: float | None = None,
    seed: int = 5,
) -> None:
    """Cancel `start()` `times` times while it runs, each at a random moment (within `within_s`,
    or by default within twice its median duration, measured first, so that the moments fall
    inside the call on a slow machine and on a fast one), and assert that every one ended
    cancelled: none ran on, none hung."""
    rng = random.Random(seed)
    if within_s is None:
        durations = []
        for _ in range(21):
            began = time.perf_counter()
            await start()
            durations.append(time.perf_counter() - began)
        within_s = 2 * sorted(durations)[10]
    cancelled = 0
    for _ in range(times * 20):
        task = asyncio.ensure_future(start())
        await moment(rng.random() * within_s)
        if not task.cancel():
            continue  # it had finished
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert done, "a cancelled task did not stop within 2 s"
        assert task.cancelled(), f"a cancelled task ran on and returned {task.result()!r}"
        cancelled += 1
        if cancelled == times:
            return
    raise AssertionError(f"only {cancelled} of {times} cancellations came while it ran")


def emptied_redis(url: str) -> str:
    """`url`'s database, emptied first (a missing Redis fails in CI, else skips)."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).flushdb()
    except redis.ConnectionError as exc:
        missing_service(f"no Redis at {url} ({exc}); start one or set KVROUTE_TEST_REDIS_URL")
    return url


@pytest.fixture
def redis_url() -> str:
    """A real Redis database of the tests' own (KVROUTE_TEST_REDIS_URL), emptied first."""
    return emptied_redis(REDIS_URL)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A Redis Cluster: KVROUTE_TEST_REDIS_CLUSTER_URL, else a private one (3 masters, 3 replicas
    on loopback) for the session. Tests keep apart by their own keys (tenants, prompts)."""
    url = os.environ.get("KVROUTE_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing_service("no Redis Cluster: set KVROUTE_TEST_REDIS_CLUSTER_URL or install redis")
    with PrivateRedisCluster() as cluster:
        yield cluster.url


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    """This loop's lag meter, running (as the app runs it)."""
    meter = LoopLag()
    async with background([meter.run()]):
        yield meter


async def saturate(until: asyncio.Event, hold_s: float, tasks: int) -> None:
    """`tasks` callbacks each holding the loop for `hold_s`, over and over: a router whose
    event loop is busier than it can serve."""

    async def hog() -> None:
        while not until.is_set():
            time.sleep(hold_s)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    await asyncio.gather(*(hog() for _ in range(tasks)))
