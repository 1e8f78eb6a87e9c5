"""app/responses.py: the owner map and the kept conversations, in memory and in a real Redis."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from app.looplag import LoopLag
from app.responses import (
    MAX_ENTRIES,
    MemoryResponses,
    RedisResponses,
    ResponseStore,
    Turn,
    history,
    input_items,
    keep_turn,
    output_items,
    tenant_tag,
)
from app.services import background
from harness.redis import PrivateRedis
from tests.conftest import missing_service


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory(clock: Clock | None = None, wall: list[int] | None = None) -> MemoryResponses:
    ms = wall if wall is not None else [1]
    return MemoryResponses(60.0, 120.0, clock=clock or Clock(), wall_ms=lambda: ms[0])


async def test_owner_expires_and_a_restart_makes_it_lost() -> None:
    clock, wall = Clock(), [100]
    store = memory(clock, wall)
    assert await store.owner("resp_1") is None
    await store.remember("resp_1", "http://a")
    found = await store.owner("resp_1")
    assert found is not None
    assert (found.backend, found.state) == ("http://a", "live")
    wall[0] = 150
    await store.remember("resp_2", "http://a")  # after the restart, before anyone noticed
    wall[0] = 200
    await store.forget_backend("http://a", 0.08)  # it restarted within the last 80 ms
    lost = await store.owner("resp_1")
    assert lost is not None
    assert lost.state == "lost"
    kept = await store.owner("resp_2")  # maybe on the new process: not called lost
    assert kept is not None
    assert kept.state == "live"
    await store.forget_backend("http://a", 10.0)  # an older date moves nothing back
    assert (await store.owner("resp_2")) == kept
    await store.remember("resp_3", "http://a")
    await store.forget_backend("http://a", 0.0)
    still = await store.owner("resp_3")  # recorded at the restart's ms: lost too
    assert still is not None
    assert still.state == "lost"
    clock.now += 61
    assert await store.owner("resp_1") is None


async def test_memory_is_bounded() -> None:
    store = memory()
    for i in range(MAX_ENTRIES + 10):
        store.remember_now(f"r{i}", "b")
    assert store.describe()["owners"] == MAX_ENTRIES
    assert await store.owner("r0") is None
    assert await store.owner(f"r{MAX_ENTRIES + 9}") is not None


async def test_kept_history_is_bounded_in_bytes() -> None:
    """200 turns of ~100 KB each, with a 1 MiB budget: about the last ten are kept, whole."""
    store = MemoryResponses(60.0, 120.0, history_max_bytes=1 << 20)
    big = [{"role": "user", "content": "x" * 100_000}]
    for i in range(200):
        await store.keep_turn("t", f"resp_{i}", Turn(None, big, 100_000))
        assert 0 < int(str(store.describe()["turn_bytes"])) <= 1 << 20
    kept = [i for i in range(200) if await store.turn("t", f"resp_{i}") is not None]
    assert kept == list(range(200 - len(kept), 200))
    assert 8 <= len(kept) <= 10
    again = await store.turn("t", "resp_199")
    assert again is not None
    assert again.items == big
    await store.keep_turn("t", "resp_199", Turn(None, [], 0))  # rewritten: counted once
    assert int(str(store.describe()["turn_bytes"])) < (len(kept) - 1) * 100_100


def test_items() -> None:
    assert input_items("hi") == [{"role": "user", "content": "hi"}]
    assert input_items([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]
    body: dict[str, Any] = {
        "output": [
            {"type": "reasoning", "content": [{"text": "hidden"}]},
            {"type": "message", "content": [{"type": "output_text", "text": "a"}, {"text": "b"}]},
            {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c1"},
        ]
    }
    assert output_items(body) == [
        {"role": "assistant", "content": "ab"},
        {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c1"},
    ]


async def check_history(store: ResponseStore) -> None:
    turn1 = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    turn2 = [{"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]
    assert await keep_turn(store, "t", "r1", None, turn1, 10_000)
    assert await keep_turn(store, "t", "r2", "r1", turn2, 10_000)
    assert await history(store, "t", "r2") == turn1 + turn2
    assert await history(store, "t", "r1") == turn1
    assert await history(store, "other-tenant", "r2") is None
    # Past the cap the turn is not kept; nor is any turn after one that was not.
    big = [{"role": "user", "content": "x" * 20_000}]
    assert not await keep_turn(store, "t", "r3", "r2", big, 10_000)
    assert await history(store, "t", "r3") is None
    assert not await keep_turn(store, "t", "r4", "r3", turn1, 10_000)


async def test_history_in_memory() -> None:
    await check_history(memory())


@pytest.fixture
async def redis_store(redis_url: str) -> Any:
    client = redis_asyncio.Redis.from_url(redis_url)
    yield (
        client,
        RedisResponses(
            client, redis_url, owner_ttl_s=60, history_ttl_s=60, timeout_s=1.0, retry_s=1.0
        ),
    )
    await client.aclose()


async def test_redis_shares_owners_and_history(redis_store: Any) -> None:
    client, store = redis_store
    await store.remember("resp_9", "http://b")
    raw = await client.get("kvroute:resp:o:resp_9")
    assert raw.endswith(b"|http://b")
    assert 0 < await client.pttl("kvroute:resp:o:resp_9") <= 60_000
    other = RedisResponses(
        client, "redis://x", owner_ttl_s=60, history_ttl_s=60, timeout_s=1.0, retry_s=1.0
    )
    found = await other.owner("resp_9")  # another replica: from Redis, not its memory
    assert found is not None
    assert found.backend == "http://b"
    await check_history(store)
    assert await history(other, "t", "r2") is not None
    keys = [k.decode() for k in await client.keys("kvroute:resp:h:*")]
    assert all(tenant_tag("t") in k for k in keys)  # the tenant is hashed, never in clear
    assert not any(":t:" in k for k in keys)


async def test_a_stalled_loop_is_not_a_failed_redis(redis_url: str, lag: LoopLag) -> None:
    # The records are awaited on the request path: a router whose loop stalls past the timeout
    # (0.5 s by default) while Redis answers must keep sharing them, not go to memory for
    # REDIS_RETRY_S and leave the other replicas unable to find this one's conversations.
    client = redis_asyncio.Redis.from_url(redis_url)
    store = RedisResponses(
        client, redis_url, owner_ttl_s=60, history_ttl_s=60, timeout_s=0.5, retry_s=30, lag=lag
    )
    try:
        calls = [
            asyncio.create_task(store.remember(f"stall_{i}", "http://a")) for i in range(3)
        ] + [asyncio.create_task(store.owner("stall_none"))]
        await asyncio.sleep(0)  # each call is waiting for Redis now
        time.sleep(0.8)  # noqa: ASYNC251 (the stall under test)
        await asyncio.gather(*calls)
        assert (store.errors, store.describe()["state"]) == (0, "up")
        assert await client.exists(*(f"kvroute:resp:o:stall_{i}" for i in range(3))) == 3
    finally:
        await client.aclose()


async def test_redis_down_serves_from_memory() -> None:
    client = redis_asyncio.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    store = RedisResponses(
        client,
        "redis://127.0.0.1:1/0",
        owner_ttl_s=60,
        history_ttl_s=60,
        timeout_s=0.5,
        retry_s=30.0,
    )
    await store.remember("resp_1", "http://a")
    found = await store.owner("resp_1")
    assert found is not None
    assert found.backend == "http://a"
    assert store.describe()["state"] == "down (serving from memory)"
    await client.aclose()


async def test_what_redis_refused_is_written_once_it_is_back() -> None:
    """A conversation this replica served while Redis was away is continued by another replica
    once Redis is back: the owner and the turns are written again, with the time they have left."""

    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis().start()
    client = redis_asyncio.Redis.from_url(server.url, socket_connect_timeout=0.2)
    store = RedisResponses(
        client, server.url, owner_ttl_s=60, history_ttl_s=60, timeout_s=0.3, retry_s=0.2
    )
    try:
        async with background([store.run()]):
            server.stop()
            await store.remember("resp_a", "http://a")
            turn = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
            assert await keep_turn(store, "t", "resp_a", None, turn, 10_000)
            assert store.describe()["unwritten"] == 2
            server = PrivateRedis(port=server.port).start()
            for _ in range(100):  # the writer retries every retry_s
                if store.rewritten == 2:
                    break
                await asyncio.sleep(0.05)
            assert store.describe()["unwritten"] == 0, (store.errors, store.describe())
            assert (store.rewritten, store.unwritten_dropped) == (2, 0)
            fresh = redis_asyncio.Redis.from_url(server.url)
            other = RedisResponses(
                fresh, server.url, owner_ttl_s=60, history_ttl_s=60, timeout_s=1.0, retry_s=1.0
            )
            found = await other.owner("resp_a")
            assert found is not None
            assert found.backend == "http://a"
            assert await history(other, "t", "resp_a") == turn
            assert 0 < await fresh.pttl("kvroute:resp:o:resp_a") <= 60_000
            await fresh.aclose()
    finally:
        await client.aclose()
        server.stop()


async def test_a_failed_redis_is_not_asked_again_before_the_retry() -> None:
    """After one failure, calls go to memory until REDIS_RETRY_S (no request waits out the
    timeout again); what they recorded waits to be written."""

    client = redis_asyncio.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    store = RedisResponses(
        client, "redis://127.0.0.1:1/0", owner_ttl_s=60, history_ttl_s=60, timeout_s=0.5, retry_s=30
    )
    for i in range(5):
        await store.remember(f"resp_{i}", "http://a")
        assert await store.owner(f"unknown_{i}") is None
    assert store.errors == 1
    assert store.describe()["unwritten"] == 5
    await client.aclose()
