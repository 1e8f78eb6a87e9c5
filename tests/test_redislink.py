"""The Redis edge: failure causes, a deadline that measures Redis, not our loop, and the pool
warmed at start-up (the one test here with a server is marked `redis`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis import exceptions as rex
from redis.asyncio import Redis

from app.looplag import LoopLag
from app.redislink import (
    cancellation_kept,
    fallback_cause,
    is_cluster,
    redis_client,
    redis_deadline,
    warm,
)
from harness.ports import free_port
from tests.conftest import saturate


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (TimeoutError(), "timeout"),
        (rex.TimeoutError("read"), "timeout"),
        (rex.ConnectionError("refused"), "connection"),
        (ConnectionRefusedError(), "connection"),
        (rex.MovedError("3999 127.0.0.1:7001"), "cluster"),
        (rex.ClusterDownError("CLUSTERDOWN The cluster is down"), "cluster"),
        (rex.TryAgainError("TRYAGAIN"), "cluster"),
        (rex.SlotNotCoveredError("slot 12 not covered"), "cluster"),
        (rex.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), "cluster"),
        (rex.ResponseError("MOVED 3999 127.0.0.1:7001"), "cluster"),
        (rex.ResponseError("ERR unknown command"), "other"),
        (rex.ReadOnlyError("READONLY"), "other"),
        (AttributeError("'NoneType' object has no attribute 'writelines'"), "other"),
        (RuntimeError("unable to perform operation on <TCPTransport closed=True>"), "other"),
    ],
)
def test_fallback_causes(exc: BaseException, cause: str) -> None:
    assert fallback_cause(exc) == cause


def test_cluster_mode_forced_or_asked() -> None:
    silent = f"redis://127.0.0.1:{free_port()}/0"
    assert is_cluster(silent, "true")
    assert not is_cluster(silent, "false")
    assert not is_cluster(silent, "auto", timeout_s=0.2)  # no answer: a single node


async def reply_after_turns(turns: int) -> str:
    """A reply already on the wire that takes `turns` loop turns to read (connect, handshake,
    pipeline): what a healthy Redis looks like from a saturated loop."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return "reply"


async def test_a_saturated_loop_is_not_a_redis_timeout(lag: LoopLag) -> None:
    done = asyncio.Event()
    hogs = asyncio.create_task(saturate(done, hold_s=0.01, tasks=4))  # ~40 ms per loop turn
    await asyncio.sleep(0.1)
    try:
        started = time.monotonic()
        async with redis_deadline(0.05, lag, cap_s=5.0):
            assert await reply_after_turns(6) == "reply"
        # It took far longer than the 50 ms budget, all of it our loop's.
        assert time.monotonic() - started > 0.1
        with pytest.raises(TimeoutError):  # without the lag meter, the same wait times out
            async with redis_deadline(0.05, LoopLag(), cap_s=5.0):
                await reply_after_turns(6)
    finally:
        done.set()
        await hogs


async def test_a_burst_that_wakes_an_idle_ticker_counts_as_lag(lag: LoopLag) -> None:
    assert lag.open == 0  # idle: the ticker is not ticking
    # A burst already queued when the deadline opens runs before the ticker's first turn and
    # holds the loop past the budget.
    asyncio.get_running_loop().call_soon(time.sleep, 0.08)
    async with redis_deadline(0.05, lag, cap_s=5.0):
        assert await reply_after_turns(10) == "reply"
    assert lag.open == 0


async def test_a_silent_redis_times_out_on_an_idle_loop(lag: LoopLag) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with redis_deadline(0.05, lag, cap_s=5.0):
            await asyncio.Event().wait()  # no reply, ever
    assert 0.045 <= time.monotonic() - started < 0.5


async def test_the_cap_bounds_a_silent_redis_behind_a_saturated_loop(lag: LoopLag) -> None:
    done = asyncio.Event()
    hogs = asyncio.create_task(saturate(done, hold_s=0.02, tasks=4))
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with redis_deadline(0.05, lag, cap_s=0.3):
                await asyncio.Event().wait()
        assert time.monotonic() - started < 1.0
    finally:
        done.set()
        await hogs


async def swallowing(work: asyncio.Future[str]) -> str:
    """Python 3.11's `asyncio.wait_for` (around each redis-py send) when its task is cancelled as
    the awaited work completes: the result comes back and the cancellation is lost."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        return work.result()


async def cancel_as_work_completes(call: Any) -> tuple[asyncio.Task[Any], list[str]]:
    ran_on: list[str] = []
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(call(work, ran_on))
    await asyncio.sleep(0)
    work.set_result("sent")
    task.cancel()
    await asyncio.wait([task])
    return task, ran_on


async def test_a_swallowed_cancellation_is_raised_on_the_way_out(lag: LoopLag) -> None:
    async def bare(work: asyncio.Future[str], ran_on: list[str]) -> None:
        ran_on.append(await swallowing(work))

    async def kept(work: asyncio.Future[str], ran_on: list[str]) -> None:
        async with cancellation_kept():
            result = await swallowing(work)
        ran_on.append(result)

    async def under_deadline(work: asyncio.Future[str], ran_on: list[str]) -> None:
        async with redis_deadline(5.0, lag, cap_s=5.0):
            result = await swallowing(work)
        ran_on.append(result)

    task, ran_on = await cancel_as_work_completes(bare)
    assert ran_on == ["sent"]
    assert not task.cancelled()
    for call in (kept, under_deadline):
        task, ran_on = await cancel_as_work_completes(call)
        assert ran_on == []
        assert task.cancelled()
    assert lag.open == 0


async def test_a_redis_error_after_a_swallowed_cancellation_is_the_cancellation() -> None:
    async def call(work: asyncio.Future[str], ran_on: list[str]) -> None:
        try:
            async with cancellation_kept():
                await swallowing(work)
                raise rex.ConnectionError("reset")
        except rex.RedisError:
            ran_on.append("served from memory")  # what the store does with a Redis error

    task, ran_on = await cancel_as_work_completes(call)
    assert ran_on == []
    assert task.cancelled()


async def test_its_own_deadline_and_plain_calls_pass_through(lag: LoopLag) -> None:
    async with cancellation_kept():
        assert await reply_after_turns(3) == "reply"
    with pytest.raises(TimeoutError):  # a timeout is not a cancellation
        async with cancellation_kept(), asyncio.timeout(0.01):
            await asyncio.Event().wait()
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


@pytest.mark.redis
async def test_warm_opens_the_pool_once_and_reuses_it(redis_url: str) -> None:
    client = redis_client(redis_url, 0.5)
    try:
        assert await warm(client, 16, 2.0) == 16
        assert isinstance(client, Redis)  # a single node: one pool
        pool: Any = client.connection_pool
        assert len(pool._available_connections) == 16
        assert await warm(client, 16, 2.0) == 16  # warm again: the same 16
        assert len(pool._available_connections) == 16
    finally:
        await client.aclose()


async def test_warm_never_holds_up_a_start_without_redis() -> None:
    refused = redis_client(f"redis://127.0.0.1:{free_port()}/0", 0.5)
    started = time.monotonic()
    assert await warm(refused, 8, 2.0) == 0
    assert time.monotonic() - started < 1.0
    await refused.aclose()
    # A server that accepts and never answers: the start-up waits its bound, no longer.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    mute = redis_client(f"redis://127.0.0.1:{port}/0", 5.0)
    try:
        started = time.monotonic()
        assert await warm(mute, 8, 0.3) == 0
        assert time.monotonic() - started < 1.0
    finally:
        await mute.aclose()
        silent.close()
