"""Tenant rate limits shared through a real Redis (`KVROUTE_TEST_REDIS_URL`, db 13 by default)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx
import pytest

from app.errors import Overloaded
from app.ownership import redis_client
from app.rates import RedisRateLimits
from harness.ports import free_port
from tests.conftest import cancel_midway, running_router, running_simulators


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_replicas_share_one_budget(redis_url: str) -> None:
    a = RedisRateLimits(redis_client(redis_url, 0.5), rpm=3, tpm=0, timeout_s=0.5)
    b = RedisRateLimits(redis_client(redis_url, 0.5), rpm=3, tpm=0, timeout_s=0.5)
    await a.check("t", 1)
    await b.check("t", 1)
    await a.check("t", 1)
    with pytest.raises(Overloaded, match="RPM") as info:
        await b.check("t", 1)
    assert 1 <= int(info.value.headers()["Retry-After"]) <= 20
    await b.check("other", 1)  # budgets are per tenant
    assert a.fallbacks == b.fallbacks == 0


async def test_a_cancelled_check_ends_cancelled(redis_url: str) -> None:
    """A client that leaves during its rate check is not let through (redis-py on Python 3.11
    swallows most cancellations that reach a command: see `cancellation_kept`)."""
    limits = RedisRateLimits(redis_client(redis_url, 0.5), rpm=10**9, tpm=0, timeout_s=0.5)
    await cancel_midway(lambda: limits.check("t", 1), 100)
    assert limits.fallbacks == 0


async def test_token_budget(redis_url: str) -> None:
    limits = RedisRateLimits(redis_client(redis_url, 0.5), rpm=0, tpm=1000, timeout_s=0.5)
    await limits.check("t", 900)
    with pytest.raises(Overloaded, match="TPM"):
        await limits.check("t", 200)


async def test_unreachable_redis_falls_back_to_local_buckets() -> None:
    limits = RedisRateLimits(
        redis_client(f"redis://127.0.0.1:{free_port()}/0", 0.5), rpm=2, tpm=0, timeout_s=0.05
    )
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


async def test_refunds_are_written_by_the_background_writer(redis_url: str) -> None:
    """Two replicas, one budget: what one request did not use goes back to the shared bucket
    (capped at the limit), from the writer, off the request path."""
    a = RedisRateLimits(redis_client(redis_url, 0.5), rpm=0, tpm=1000, timeout_s=0.5)
    b = RedisRateLimits(redis_client(redis_url, 0.5), rpm=0, tpm=1000, timeout_s=0.5)
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


async def test_refunds_without_redis_go_to_the_local_buckets() -> None:
    limits = RedisRateLimits(
        redis_client(f"redis://127.0.0.1:{free_port()}/0", 0.5), rpm=0, tpm=1000, timeout_s=0.05
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
