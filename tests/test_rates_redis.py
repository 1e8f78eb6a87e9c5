"""Tenant rate limits shared through a real Redis (`KVROUTE_TEST_REDIS_URL`, db 13 by default)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from app.errors import Overloaded
from app.ownership import redis_client
from app.rates import RedisRateLimits
from app.resp import links_for
from harness.ports import free_port
from harness.tcpproxy import FreezingProxy
from tests.conftest import cancel_midway, private_redis, running_router, running_simulators


@pytest.fixture(params=["lean", "redis-py"])
def lookup(request: pytest.FixtureRequest) -> str:
    """Each check runs on both request-path clients (REDIS_LOOKUP_CLIENT)."""
    return str(request.param)


def new_limits(url: str, lookup: str, **kwargs: Any) -> RedisRateLimits:
    client = redis_client(url, 0.5)
    links = links_for(client) if lookup == "lean" else None
    assert links is not None or lookup != "lean"
    return RedisRateLimits(client, links=links, **kwargs)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_replicas_share_one_budget(redis_url: str, lookup: str) -> None:
    a = new_limits(redis_url, lookup, rpm=3, tpm=0, timeout_s=0.5)
    b = new_limits(redis_url, lookup, rpm=3, tpm=0, timeout_s=0.5)
    await a.check("t", 1)
    await b.check("t", 1)
    await a.check("t", 1)
    with pytest.raises(Overloaded, match="RPM") as info:
        await b.check("t", 1)
    assert 1 <= int(info.value.headers()["Retry-After"]) <= 20
    await b.check("other", 1)  # budgets are per tenant
    assert a.fallbacks == b.fallbacks == 0


async def test_a_cancelled_check_ends_cancelled(redis_url: str, lookup: str) -> None:
    """A client that leaves during its rate check is not let through (redis-py on Python 3.11
    swallows most cancellations that reach a command: see `cancellation_kept`)."""
    limits = new_limits(redis_url, lookup, rpm=10**9, tpm=0, timeout_s=0.5)
    await cancel_midway(lambda: limits.check("t", 1), 100)
    assert limits.fallbacks == 0


async def test_token_budget(redis_url: str, lookup: str) -> None:
    limits = new_limits(redis_url, lookup, rpm=0, tpm=1000, timeout_s=0.5)
    await limits.check("t", 900)
    with pytest.raises(Overloaded, match="TPM"):
        await limits.check("t", 200)


async def test_unreachable_redis_falls_back_to_local_buckets(lookup: str) -> None:
    limits = new_limits(f"redis://127.0.0.1:{free_port()}/0", lookup, rpm=2, tpm=0, timeout_s=0.05)
    await limits.check("t", 1)
    await limits.check("t", 1)
    with pytest.raises(Overloaded):
        await limits.check("t", 1)
    assert limits.fallbacks == 3


def test_router_answers_429_past_the_tenant_rpm(redis_url: str) -> None:
    body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with (
        running_simulators(1, base_ttft_s=0.0, prefill_s_per_token=0.0) as sims,
        running_router(
            [sims[0].url],
            served_model="sim-model",
            redis_url=redis_url,
            tenant_rpm=5,
            trust_tenant_headers=True,
        ) as r,
    ):
        statuses = [
            httpx.post(
                f"{r.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "busy"}
            ).status_code
            for _ in range(7)
        ]
        assert statuses == [200] * 5 + [429] * 2
        limited = httpx.post(
            f"{r.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "busy"}
        )
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert "Retry-After" in limited.headers
        rejected = httpx.get(f"{r.url}/metrics").json()["admission"]["rejected"]
        assert rejected == {"rate_rpm": 3}
        assert (
            httpx.post(
                f"{r.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "calm"}
            ).status_code
            == 200
        )


async def test_refunds_are_written_by_the_background_writer(redis_url: str, lookup: str) -> None:
    """Two replicas, one budget: what one request did not use goes back to the shared bucket
    (capped at the limit), from the writer, off the request path."""
    a = new_limits(redis_url, lookup, rpm=0, tpm=1000, timeout_s=0.5)
    b = new_limits(redis_url, lookup, rpm=0, tpm=1000, timeout_s=0.5)
    tenant = f"refund-{free_port()}"
    await a.check(tenant, 900)
    with pytest.raises(Overloaded, match="TPM"):
        await b.check(tenant, 600)
    writer = asyncio.create_task(a.run())
    try:
        a.refund(tenant, 850)
        a.refund(tenant, 5000)  # past the limit: only what fits goes back
        await wait_until(lambda: a.refunded >= 898)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    # 850, then what fits: 50 less the few tokens refilled meanwhile (each rounded)
    assert 898 <= a.refunded <= 900
    await b.check(tenant, 1000)  # the bucket is full again, for the other replica too
    assert a.fallbacks == b.fallbacks == 0


async def test_refunds_without_redis_go_to_the_local_buckets(lookup: str) -> None:
    limits = new_limits(
        f"redis://127.0.0.1:{free_port()}/0", lookup, rpm=0, tpm=1000, timeout_s=0.05
    )
    await limits.check("t", 900)  # Redis is down: charged locally
    writer = asyncio.create_task(limits.run())
    try:
        limits.refund("t", 800)
        await wait_until(lambda: limits.refunded == 800)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    await limits.check("t", 900)
    assert limits.fallbacks == 3  # two checks and one refund batch


async def test_both_clients_charge_one_budget_and_survive_a_script_flush() -> None:
    """A replica on the lean link and one on redis-py run the same script on the same keys; a
    Redis that lost its scripts (restart, SCRIPT FLUSH) gets it again with EVAL."""
    server = private_redis()
    try:
        lean = new_limits(server.url, "lean", rpm=4, tpm=0, timeout_s=0.5)
        plain = new_limits(server.url, "redis-py", rpm=4, tpm=0, timeout_s=0.5)
        await lean.check("t", 1)
        await plain.check("t", 1)
        redis.Redis.from_url(server.url).script_flush()
        await lean.check("t", 1)
        await plain.check("t", 1)
        for limits in (lean, plain):
            with pytest.raises(Overloaded, match="RPM"):
                await limits.check("t", 1)
        assert lean.fallbacks == plain.fallbacks == 0
    finally:
        server.stop()


async def test_a_connection_gone_silent_is_replaced_once_a_check_times_out_on_it(
    redis_url: str,
) -> None:
    """As for ownership: the rate check that times out on a silent connection drops it, and the
    next check is answered on a new one."""
    where = urlsplit(redis_url)
    async with FreezingProxy(where.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}{where.path}"
        limits = new_limits(url, "lean", rpm=100, tpm=0, timeout_s=0.05)
        await limits.check("t", 1)
        proxy.freeze()
        await limits.check("t", 1)  # served by the local buckets
        proxy.thaw()
        for _ in range(3):
            await limits.check("t", 1)
        assert limits.fallbacks == 1
        assert proxy.connections == 2
