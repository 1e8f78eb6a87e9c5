from __future__ import annotations

import asyncio

import pytest

from app.admission import Admission, Limits, RateLimits, TokenBucket
from app.errors import Overloaded


def always() -> bool:
    return True


async def test_grants_at_once_under_the_limits() -> None:
    adm = Admission(Limits(max_in_flight=2))
    a = await adm.acquire("t", always)
    b = await adm.acquire("t", always)
    assert (adm.in_flight, a.queue_ms < 5, b.queue_ms < 5) == (2, True, True)
    a.release()
    a.release()  # idempotent
    assert adm.in_flight == 1


async def test_waits_for_a_release_then_records_queue_time() -> None:
    adm = Admission(Limits(max_in_flight=1))
    held = await adm.acquire("t", always)
    waiter = asyncio.create_task(adm.acquire("t", always))
    await asyncio.sleep(0.05)
    assert not waiter.done() and adm.waiting == 1
    held.release()
    slot = await asyncio.wait_for(waiter, 1)
    assert slot.queue_ms >= 40 and adm.stats.queued == 1 and adm.waiting == 0


async def test_round_robin_between_tenants() -> None:
    adm = Admission(Limits(max_in_flight=1))
    held = await adm.acquire("flood", always)
    order: list[str] = []

    async def ask(tenant: str) -> None:
        slot = await adm.acquire(tenant, always)
        order.append(tenant)
        await asyncio.sleep(0.01)
        slot.release()

    tasks = [asyncio.create_task(ask("flood")) for _ in range(6)]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(ask("quiet")))
    await asyncio.sleep(0.01)
    held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # The quiet tenant arrived last but is served second, not seventh.
    assert order.index("quiet") == 1


async def test_tenant_limit_does_not_block_other_tenants() -> None:
    adm = Admission(Limits(max_in_flight_per_tenant=1))
    await adm.acquire("a", always)
    blocked = asyncio.create_task(adm.acquire("a", always))
    other = await asyncio.wait_for(adm.acquire("b", always), 1)
    assert other.tenant == "b" and not blocked.done()
    blocked.cancel()


async def test_readiness_gates_and_is_polled() -> None:
    adm = Admission(Limits())
    state = {"ready": False}
    waiter = asyncio.create_task(adm.acquire("t", lambda: state["ready"]))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    state["ready"] = True  # e.g. vLLM's waiting queue drained: no release needed
    await asyncio.wait_for(waiter, 1)


async def test_full_queue_and_timeout_are_429s() -> None:
    adm = Admission(Limits(max_in_flight=1, max_queue=1, queue_timeout_s=0.1))
    await adm.acquire("t", always)
    first = asyncio.create_task(adm.acquire("t", always))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as full:
        await adm.acquire("u", always)
    assert full.value.status == 429 and "Retry-After" in full.value.headers()
    with pytest.raises(Overloaded, match="no backend capacity"):
        await first
    assert adm.waiting == 0
    assert adm.stats.rejected == {"queue_full": 1, "queue_timeout": 1}


async def test_cancelled_waiter_leaves_the_queue() -> None:
    adm = Admission(Limits(max_in_flight=1))
    held = await adm.acquire("t", always)
    waiter = asyncio.create_task(adm.acquire("t", always))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.waiting == 0
    held.release()
    assert adm.in_flight == 0


def test_token_bucket_refills() -> None:
    bucket = TokenBucket(per_minute=60, now_s=0)
    assert all(bucket.take(1, 0) == 0 for _ in range(60))
    assert bucket.take(1, 0) == pytest.approx(1.0)
    assert bucket.take(1, 1.0) == 0


def test_rate_limits_per_tenant() -> None:
    now = [0.0]
    rates = RateLimits(rpm=2, tpm=100, clock=lambda: now[0])
    rates.check_now("a", 10)
    rates.check_now("a", 10)
    with pytest.raises(Overloaded, match="RPM"):
        rates.check_now("a", 10)
    rates.check_now("b", 90)
    with pytest.raises(Overloaded, match="TPM") as info:
        rates.check_now("b", 50)
    assert float(info.value.headers()["Retry-After"]) >= 1
