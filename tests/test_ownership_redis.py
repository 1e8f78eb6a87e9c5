"""RedisStore against a real Redis server (`KVROUTE_TEST_REDIS_URL`, default db 13 on :6379)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.config import Settings
from app.looplag import LoopLag
from app.ownership import WRITE_ATTEMPTS, RedisStore, redis_client
from app.percentile import percentiles
from app.prefix import PrefixKeys
from app.resp import links_for
from app.services import background, build_services
from harness.ports import free_port
from harness.redis import PrivateRedis
from harness.tcpproxy import FreezingProxy
from tests.conftest import cancel_midway, missing_service

pytestmark = pytest.mark.redis


def writing(*stores: RedisStore) -> AbstractAsyncContextManager[None]:
    """The stores' writers running, as the app's lifespan runs them."""
    return background([store.run() for store in stores])


def keys(conv: str, system: str = "sys") -> PrefixKeys:
    return PrefixKeys(conversation=conv, system=system, prompt_chars=0, system_chars=0)


@pytest.fixture(params=["lean", "redis-py"])
def lookup(request: pytest.FixtureRequest) -> str:
    """Each store test runs on both look-up clients (REDIS_LOOKUP_CLIENT)."""
    return str(request.param)


def new_store(url: str, client_timeout_s: float, lookup: str, **kwargs: Any) -> RedisStore:
    client = redis_client(url, client_timeout_s)
    links = links_for(client) if lookup == "lean" else None
    assert links is not None or lookup != "lean"
    return RedisStore(client, url, links=links, **kwargs)


def store_at(redis_url: str, lookup: str, *, load_interval_s: float = 0.05) -> RedisStore:
    """A store on its own client, as each router process has (no read-through cache)."""
    return new_store(
        redis_url,
        0.5,
        lookup,
        ttl_s=60,
        timeout_s=0.5,
        retry_s=0.2,
        cache_s=0.0,
        load_interval_s=load_interval_s,
    )


@pytest.fixture
async def replicas(redis_url: str, lookup: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    a, b = store_at(redis_url, lookup), store_at(redis_url, lookup)
    async with writing(a, b):
        yield a, b


async def settle(*stores: RedisStore) -> None:
    for store in stores:
        for _ in range(200):
            if store._queue.empty():
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)


async def test_two_replicas_agree_on_the_owner(replicas: tuple[RedisStore, RedisStore]) -> None:
    a, b = replicas
    await a.record(keys("conv1"), "b2", 500, claim=True)
    await settle(a)
    seen = await b.lookup(keys("conv1"))
    assert (seen.owner, seen.owner_tokens, seen.system_holders) == ("b2", 500, ("b2",))


async def test_first_claim_is_atomic(replicas: tuple[RedisStore, RedisStore]) -> None:
    a, b = replicas
    # Both replicas claim the same new key for different backends at the same time.
    await asyncio.gather(
        a.record(keys("race"), "b0", 1, claim=True), b.record(keys("race"), "b1", 1, claim=True)
    )
    await settle(a, b)
    owner_a = (await a.lookup(keys("race"))).owner
    owner_b = (await b.lookup(keys("race"))).owner
    assert owner_a == owner_b
    assert owner_a in {"b0", "b1"}
    # The loser follows the winner in its own memory too (its fallback view).
    assert (
        a.memory.lookup_now(keys("race")).owner
        == b.memory.lookup_now(keys("race")).owner
        == owner_a
    )


async def test_a_lookup_sees_this_replicas_records_before_they_are_written(
    redis_url: str,
    lookup: str,
) -> None:
    """A home chosen a moment ago (its write still queued) counts for the next conversation on
    that system prompt, as in memory; a record Redis holds decides the owner."""
    store = new_store(redis_url, 0.5, lookup, ttl_s=60, timeout_s=0.5, retry_s=0.2, cache_s=0.0)
    other = new_store(redis_url, 0.5, lookup, ttl_s=60, timeout_s=0.5, retry_s=0.2, cache_s=0.0)
    # No writer runs yet: the records wait in the queue.
    await store.record(keys("first", system="s1"), "b2", 300, claim=True)
    assert not store._queue.empty()
    seen = await store.lookup(keys("second", system="s1"))
    assert (seen.owner, seen.system_holders) == (None, ("b2",))
    again = await store.lookup(keys("first", system="s1"))
    assert (again.owner, again.owner_tokens) == ("b2", 300)
    assert (await other.lookup(keys("second", system="s1"))).system_holders == ()
    async with writing(store, other):
        await settle(store)
        # Another replica moves the conversation: Redis's owner wins over this one's memory.
        await other.record(keys("first", system="s1"), "b0", 400, claim=False)
        await settle(other)
        moved = await store.lookup(keys("first", system="s1"))
        assert (moved.owner, moved.owner_tokens) == ("b0", 400)
        assert set(moved.system_holders) == {"b0", "b2"}


async def test_the_router_reads_redis_on_every_lookup_by_default(
    redis_url: str, lookup: str
) -> None:
    """OWNERSHIP_CACHE_S defaults to 0: as built by the router, a replica's look-up of a
    conversation it read a moment ago still sees what another replica recorded since."""
    settings = Settings(backend_urls=["http://127.0.0.1:9"], redis_url=redis_url)
    assert settings.ownership_cache_s == 0.0
    store = build_services(settings).store
    assert isinstance(store, RedisStore)
    other = store_at(redis_url, lookup)
    k = keys("moved")
    async with writing(other):
        await other.record(k, "b0", 100, claim=True)
        await settle(other)
        assert (await store.lookup(k)).owner == "b0"
        await other.record(k, "b1", 200, claim=False)  # it spilled there
        await settle(other)
        seen = await store.lookup(k)
        assert (seen.owner, seen.owner_tokens) == ("b1", 200)


async def test_a_cached_lookup_sees_homes_this_replica_opened_since(
    redis_url: str, lookup: str
) -> None:
    """The read-through cache answers a conversation's next turn without Redis; a home another
    conversation of the same system prompt opened on this replica since counts there too, as it
    would in memory (a spill then goes where the system prompt is cached)."""
    store = new_store(redis_url, 0.5, lookup, ttl_s=60, timeout_s=0.5, retry_s=0.2, cache_s=60)
    system = f"s-{free_port()}"
    await store.record(keys("first", system=system), "b0", 300, claim=True)
    assert (await store.lookup(keys("first", system=system))).system_holders == ("b0",)
    await store.record(keys("second", system=system), "b1", 200, claim=True)
    cached = await store.lookup(keys("first", system=system))
    assert (cached.owner, cached.owner_tokens) == ("b0", 300)
    assert set(cached.system_holders) == {"b0", "b1"}


async def test_takeover_and_ttl(redis_url: str, lookup: str) -> None:
    store = new_store(redis_url, 0.5, lookup, ttl_s=0.3, timeout_s=0.5, retry_s=0.2, cache_s=0.0)
    async with writing(store):
        await store.record(keys("k"), "b0", 1, claim=True)
        await store.record(keys("k"), "b1", 2, claim=False)
        await settle(store)
        assert (await store.lookup(keys("k"))).owner == "b1"
        await asyncio.sleep(0.5)
        assert (await store.lookup(keys("k"))).owner is None


async def test_restarted_backend_loses_its_keys(replicas: tuple[RedisStore, RedisStore]) -> None:
    a, _ = replicas
    await a.record(keys("k"), "b0", 1, claim=True)
    await settle(a)
    await asyncio.sleep(0.01)
    await a.forget_backend("b0")
    found = await a.lookup(keys("k"))
    assert found.owner is None
    assert found.system_holders == ()


async def test_unreachable_redis_serves_from_memory_and_counts(lookup: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = new_store(
        url,
        0.5,
        lookup,
        ttl_s=60,
        timeout_s=0.05,
        retry_s=30,
    )
    async with writing(store):
        await store.record(keys("k"), "b1", 7, claim=True)
        found = await store.lookup(keys("other"))
        assert found.owner is None
        assert not store.is_up()
        assert (await store.lookup(keys("k"))).owner == "b1"
        assert store.fallbacks >= 1
        assert str(store.describe()["state"]).startswith("down")


async def test_redis_stopped_mid_run_then_back(lookup: str) -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis().start()
    store = new_store(server.url, 0.5, lookup, ttl_s=60, timeout_s=0.2, retry_s=0.2, cache_s=0.0)
    try:
        async with writing(store):
            await store.record(keys("k"), "b0", 1, claim=True)
            await settle(store)
            assert (await store.lookup(keys("k"))).owner == "b0"
            assert store.is_up()
            server.stop()
            for i in range(20):  # every look-up answers, from memory
                assert (await store.lookup(keys("k"))).owner == "b0"
                await store.record(keys(f"n{i}"), "b1", 1, claim=True)
            assert store.fallbacks >= 1
            server = PrivateRedis(port=server.port).start()
            await asyncio.sleep(0.3)
            await store.record(keys("after"), "b2", 1, claim=True)
            await settle(store)
            assert (await store.lookup(keys("after"))).owner == "b2"
            assert store.describe()["state"] == "up"
            # What was served from memory meanwhile was held and written once Redis was back:
            # another replica sees it.
            other = store_at(server.url, lookup)
            for i in range(20):
                assert (await other.lookup(keys(f"n{i}"))).owner == "b1", i
            assert store.describe()["records_dropped"] == 0
    finally:
        server.stop()


async def test_records_redis_keeps_refusing_are_dropped_and_counted(lookup: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = new_store(url, 0.5, lookup, ttl_s=60, timeout_s=0.05, retry_s=0.05)
    async with writing(store):
        await store.record(keys("k"), "b1", 7, claim=True)
        for _ in range(200):
            if store.records_dropped:
                break
            await asyncio.sleep(0.01)
        assert store.describe()["records_dropped"] == 1
        assert store.errors >= WRITE_ATTEMPTS
        assert (await store.lookup(keys("k"))).owner == "b1"  # memory kept it


def test_router_counts_fallbacks_by_cause_in_both_metrics_views() -> None:
    import httpx

    from tests.conftest import running_router, running_simulators

    body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with (
        running_simulators(1, base_ttft_s=0.0, prefill_s_per_token=0.0) as sims,
        running_router(
            [sims[0].url], served_model="sim-model", redis_url=f"redis://127.0.0.1:{free_port()}/0"
        ) as r,
    ):
        for i in range(3):  # nothing listens there: each request is served from memory
            chat = {**body, "messages": [{"role": "user", "content": f"hi {i}"}]}
            assert httpx.post(f"{r.url}/v1/chat/completions", json=chat).status_code == 200
        ownership = httpx.get(f"{r.url}/metrics").json()["ownership"]
        assert ownership["fallback_causes"] == {
            "timeout": 0,
            "connection": 3,
            "cluster": 0,
            "other": 0,
        }
        assert ownership["cluster"] is False
        prom = httpx.get(f"{r.url}/metrics", headers={"Accept": "text/plain;version=0.0.4"}).text
        assert 'kvroute_ownership_fallbacks_total{cause="connection"} 3.0' in prom
        assert 'kvroute_ownership_fallbacks_total{cause="timeout"} 0.0' in prom


async def test_a_system_home_unused_for_the_ttl_is_no_home(redis_url: str, lookup: str) -> None:
    """As in memory: the homes' hash lives as long as anyone uses the system prompt, so a backend
    that served it once, long ago (and has evicted it since), must not stay listed."""
    wall = [1_000_000_000]

    def replica() -> RedisStore:
        return new_store(
            redis_url, 0.5, lookup, ttl_s=60, timeout_s=0.5, retry_s=0.2, wall_ms=lambda: wall[0]
        )

    a, b = replica(), replica()
    async with writing(a, b):
        await a.record(keys("old", system="aging"), "b0", 100, claim=True)
        await settle(a)
        wall[0] += 59_000
        assert (await b.lookup(keys("x", system="aging"))).system_holders == ("b0",)
        await b.record(keys("new", system="aging"), "b1", 100, claim=True)
        await settle(b)
        wall[0] += 2_000  # b0's use is now 61 s old, b1's 2 s
        assert (await b.lookup(keys("y", system="aging"))).system_holders == ("b1",)


async def test_replicas_share_in_flight_counts_under_a_lease(redis_url: str, lookup: str) -> None:
    a, b = store_at(redis_url, lookup), store_at(redis_url, lookup)
    a.local_in_flight = lambda: {"b0": 1}
    b.local_in_flight = lambda: {"b0": 3, "b1": 2, "b2": 0}
    seen: list[tuple[dict[str, float], float]] = []
    a.on_peer_load = lambda counts, fresh_s: seen.append((dict(counts), fresh_s))

    async def a_sees(expected: dict[str, float]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            await a.lookup(keys("any"))  # every look-up reads the shared counts too
            if a.peer_in_flight == expected:
                return
            assert loop.time() < deadline, a.peer_in_flight
            await asyncio.sleep(0.02)

    async with writing(a):
        async with writing(b):
            await a_sees({"b0": 3.0, "b1": 2.0})  # b's, never a's own
            assert seen[-1] == ({"b0": 3.0, "b1": 2.0}, 1.0)
            assert a.peer_replicas == 1  # (shown in /metrics: is the other one seen?)
        # b stopped publishing (a dead replica): its counts expire with its lease...
        await a_sees({})
        assert a.peer_replicas == 0
        # ...and a drops its entry from Redis.
        import redis

        sync = redis.Redis.from_url(redis_url)
        wait_fields = asyncio.get_running_loop().time() + 5
        while b.replica.encode() in sync.hkeys(a.load_key):
            assert asyncio.get_running_loop().time() < wait_fields
            await a.lookup(keys("any"))
            await asyncio.sleep(0.05)
        sync.close()


@pytest.mark.parametrize("shared", [None, False, True])
def test_shared_load_is_on_with_redis_unless_turned_off(
    redis_url: str, shared: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None: the default (nothing set), on whenever REDIS_URL is."""
    from app.config import Settings
    from app.services import build_services

    monkeypatch.delenv("SHARED_LOAD", raising=False)
    asked = {} if shared is None else {"shared_load": shared}
    services = build_services(
        Settings(
            backend_urls=["http://127.0.0.1:1"],
            redis_url=redis_url,
            _env_file=None,  # type: ignore[call-arg]
            **asked,  # type: ignore[arg-type]
        )
    )
    store = services.store
    assert isinstance(store, RedisStore)
    wired = shared is not False
    assert (store.local_in_flight is not None, store.on_peer_load is not None) == (wired, wired)
    # Every lease and release tells the publisher, so the others' view follows within ms.
    assert (services.pool.on_load_change is not None) is wired
    assert store.describe()["shared_load"] is wired  # (shown in /metrics)


async def test_a_change_of_the_counts_is_published_at_once_not_at_the_renewal(
    redis_url: str, lookup: str
) -> None:
    """The others see a replica's counts a few ms after they change: read 50 ms old (a fixed
    period before), they showed load that had left, and two replicas spilled more than one."""
    a, b = store_at(redis_url, lookup), store_at(redis_url, lookup)
    b.load_lease_s = 120.0  # renewed every 30 s: only a change can publish within the test
    counts = {"b0": 3}
    b.local_in_flight = lambda: counts
    a.local_in_flight = dict  # (a replica sharing load reads the others' with every look-up)

    async def a_sees(expected: dict[str, float]) -> None:
        deadline = asyncio.get_running_loop().time() + 5
        while a.peer_in_flight != expected:
            assert asyncio.get_running_loop().time() < deadline, a.peer_in_flight
            await a.lookup(keys("any"))
            await asyncio.sleep(0.01)

    async with writing(b):
        await a_sees({"b0": 3.0})  # published when it started
        counts = {"b0": 1, "b1": 4}
        b.load_changed.set()  # as the pool's leases do (`services`)
        await a_sees({"b0": 1.0, "b1": 4.0})


async def test_a_lookup_sends_this_replicas_changed_counts_in_its_own_round_trip(
    redis_url: str, lookup: str
) -> None:
    """No publisher runs here: a's look-ups alone carry its counts when they changed (a first
    home proposed, held while the look-up runs, among them), and b sees them at its next one.
    In a burst the publisher's cycle came too late: two replicas sent a shared first home both
    their first conversations before either saw the other's."""
    a, b = store_at(redis_url, lookup), store_at(redis_url, lookup)
    counts = {"b0": 2}
    a.local_in_flight = lambda: counts
    b.local_in_flight = dict
    a.load_changed.set()  # as the pool's leases do (`services`)
    await a.lookup(keys("x"))
    assert not a.load_changed.is_set()  # sent: nothing left for the publisher
    await b.lookup(keys("y"))
    assert b.peer_in_flight == {"b0": 2.0}

    counts = {"b0": 2, "b1": 1}  # no change signalled: nothing sent
    await a.lookup(keys("x"))
    await b.lookup(keys("y"))
    assert b.peer_in_flight == {"b0": 2.0}

    def propose() -> str:  # as `Dispatcher.first_home` holds its proposal
        counts["b2"] = 1
        a.load_changed.set()
        return "b2"

    await a.lookup(keys("z", system="new"), first_home=propose)
    await b.lookup(keys("y"))
    assert b.peer_in_flight == {"b0": 2.0, "b1": 1.0, "b2": 1.0}


async def test_counts_a_failed_lookup_could_not_send_are_left_to_the_publisher(
    lookup: str,
) -> None:
    store = new_store(
        f"redis://127.0.0.1:{free_port()}/0", 0.2, lookup, ttl_s=60, timeout_s=0.2, retry_s=5
    )
    store.local_in_flight = lambda: {"b0": 1}
    store.load_changed.set()
    await store.lookup(keys("x"))  # refused: served from memory
    assert store.fallbacks == 1
    assert store.load_changed.is_set()


async def test_a_cancelled_lookup_or_store_always_stops(redis_url: str, lookup: str) -> None:
    """redis-py on Python 3.11 lets most cancellations that reach a command pass unseen (1490 of
    2000 cancelled at random): a look-up whose client left must not go on to a backend, and
    the store's loops must stop with the app (a test here once hung at teardown on it)."""
    store = store_at(redis_url, lookup, load_interval_s=0.001)  # the load publisher always mid-call
    store.local_in_flight = lambda: {"b0": 1}
    await cancel_midway(lambda: store.lookup(keys("c")), 100)

    async def running() -> None:
        for i in range(50):  # the writer busy too
            await store.record(keys(f"c{i}"), "b0", 10, claim=True)
        await store.run()

    await cancel_midway(running, 60, within_s=0.03)


async def test_a_loop_stalled_while_a_lookup_connects_is_not_a_redis_failure(
    redis_url: str, lag: LoopLag, lookup: str
) -> None:
    # A burst of new requests makes each look-up open its own connection; the loop then stalls
    # for longer than redis-py's own connect timeout once was (0.5 s: 8 such fallbacks in a
    # c=256 run of bench.overhead against a healthy, idle Redis). Redis answered in time.
    store = new_store(redis_url, 0.05, lookup, ttl_s=60, timeout_s=0.05, retry_s=5, lag=lag)
    lookups = [asyncio.create_task(store.lookup(keys(f"stall{i}"))) for i in range(4)]
    await asyncio.sleep(0)  # each look-up is connecting now
    time.sleep(0.8)  # noqa: ASYNC251 (the stall under test)
    await asyncio.gather(*lookups)
    assert store.fallbacks == 0, store.last_error
    # Each look-up's wall time was the stall: /metrics shows what the router's loop cost.
    assert len(store.lookup_ms) == 4
    assert min(store.lookup_ms) >= 800
    assert store.describe()["lookup_ms"] == percentiles(store.lookup_ms)


async def test_a_connection_gone_silent_is_replaced_once_a_lookup_times_out_on_it(
    redis_url: str,
) -> None:
    """A partition or a frozen host leaves the lean link's connection open and silent (no
    error, no reset). The look-up that times out on it drops it, so when Redis is tried again a
    new connection answers; kept, every later look-up would wait on the dead one."""
    where = urlsplit(redis_url)
    async with FreezingProxy(where.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}{where.path}"
        store = new_store(url, 0.5, "lean", ttl_s=60, timeout_s=0.05, retry_s=0.1)
        await store.lookup(keys("a"))
        assert (store.fallbacks, proxy.connections) == (0, 1)
        proxy.freeze()
        await store.lookup(keys("a"))
        assert store.fallback_causes["timeout"] == 1
        proxy.thaw()
        await asyncio.sleep(0.15)  # retry_s
        for _ in range(3):
            await store.lookup(keys("a"))
        assert store.fallbacks == 1, store.last_error
        assert store.describe()["state"] == "up"
        assert proxy.connections == 2


@pytest.mark.parametrize(
    ("client", "scheme", "expected"),
    [("lean", "redis", "lean"), ("redis-py", "redis", "redis-py"), ("lean", "rediss", "redis-py")],
)
def test_metrics_name_the_request_paths_redis_client(
    redis_url: str, client: str, scheme: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_url.replace("redis://", f"{scheme}://", 1)
    with caplog.at_level(logging.INFO, logger="kvroute.services"):
        services = build_services(
            Settings(
                backend_urls=["http://127.0.0.1:1"],
                redis_url=url,
                redis_cluster="false",
                redis_lookup_client=client,  # type: ignore[arg-type]
                _env_file=None,  # type: ignore[call-arg]
            )
        )
    assert services.store.describe()["lookup_client"] == expected
    said = "needs redis-py" in caplog.text
    assert said == (client == "lean" and expected == "redis-py")


async def test_replicas_opening_one_new_system_prompt_at_once_agree_on_its_first_home(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """Each proposes another backend in the same instant: Redis takes the claims one at a time,
    so the second reads the first's home instead of opening a second one."""
    a, b = replicas
    seen = await asyncio.gather(
        a.lookup(keys("burst-a", "new-prompt"), lambda: "b0"),
        b.lookup(keys("burst-b", "new-prompt"), lambda: "b1"),
    )
    assert [s.system_holders for s in seen] in ([("b0",)] * 2, [("b1",)] * 2), seen
    assert (a.first_homes_proposed, b.first_homes_proposed) == (1, 1)


async def test_a_first_home_is_claimed_only_where_no_home_is_live(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    a, b = replicas
    asked: list[str] = []

    def propose(backend: str) -> Callable[[], str]:
        def first_home() -> str:
            asked.append(backend)
            return backend

        return first_home

    # A live home (another replica's record): it stands, the proposal is not written.
    await a.record(keys("c1", "homed"), "b2", 100, claim=True)
    await settle(a)
    assert (await b.lookup(keys("c2", "homed"), propose("b0"))).system_holders == ("b2",)
    assert asked == ["b0"]
    assert (await b.lookup(keys("c3", "homed"))).system_holders == ("b2",)
    # This replica knows the home itself: nothing is asked.
    assert (await a.lookup(keys("c4", "homed"), propose("b1"))).system_holders == ("b2",)
    assert asked == ["b0"]
    # A home unused for the TTL is none: the proposal replaces it.
    stale_ms = int(time.time() * 1000) - b.ttl_ms - 1000
    await b._redis.hset(b.redis_keys(keys("c5", "stale"))[1], "b2", stale_ms)
    assert (await b.lookup(keys("c5", "stale"), propose("b1"))).system_holders == ("b1",)
    # No proposal when Redis is down: memory answers and nothing is claimed.
    b.down_until = b._clock() + 60
    assert (await b.lookup(keys("c6", "unseen"), propose("b0"))).system_holders == ()
    assert asked == ["b0", "b1"]
