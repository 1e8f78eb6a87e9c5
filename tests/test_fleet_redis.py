"""The fleet shared through a real Redis (`KVROUTE_TEST_REDIS_URL`, default db 13 on :6379):
a membership Redis lost is seeded again, never written as one entry that drains the rest."""

from __future__ import annotations

import logging

import pytest
import redis

from app.backends import BackendPool
from app.fleet import Entry, Fleet, RedisMembership
from app.redislink import redis_client

URLS = ["http://10.0.0.0:8000", "http://10.0.0.1:8000"]


async def replica(url: str) -> Fleet:
    pool = BackendPool(URLS, default_model="m")
    fleet = Fleet(pool, drain_timeout_s=10, membership=RedisMembership(redis_client(url, 0.5)))
    await fleet.start()
    return fleet


def names(fleet: Fleet) -> set[str]:
    return {b.name for b in fleet.pool.backends if not b.draining}


async def test_changes_after_redis_lost_the_membership_drain_only_what_they_name(
    redis_url: str,
) -> None:
    a, b = await replica(redis_url), await replica(redis_url)
    assert names(a) == names(b) == {"b0", "b1"}
    flush = redis.Redis.from_url(redis_url).flushdb
    assert a.membership is not None

    # A drain's late tombstone delete after the loss writes nothing (no empty membership).
    flush()
    assert await a.membership.delete("b9") is False
    assert await a.membership.put("b9", Entry("http://10.0.0.9:8000")) is False
    assert await a.membership.version() is None
    await b.sync()
    assert names(b) == {"b0", "b1"}

    # A drain through A right after a loss: the others drain that one backend, no more.
    flush()
    await a.remove("b1")
    await b.sync()
    assert names(b) == {"b0"}

    # An add through A right after a loss: the others add it and keep the rest.
    flush()
    added = await a.add("http://10.0.0.2:8000")
    await b.sync()
    assert names(b) == {"b0", added.name}
    entries = await a.membership.entries()
    assert entries["b0"].state == entries[added.name].state == "serving"
    assert "b1" not in entries or entries["b1"].state != "serving"  # leaving: not seeded back


async def test_a_membership_that_differs_from_backend_urls_is_named_at_start(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis left holding another fleet's membership drains this one's backends: not quietly."""
    await replica(redis_url)  # seeds b0, b1
    other = Fleet(
        BackendPool(["http://10.0.0.7:8000", *URLS], default_model="m"),
        drain_timeout_s=10,
        membership=RedisMembership(redis_client(redis_url, 0.5)),
    )
    with caplog.at_level(logging.WARNING, logger="kvroute.fleet"):
        await other.start()
    assert names(other) == {"b0", "b1"}
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "differs from BACKEND_URLS" in warning
    assert "b0 is http://10.0.0.0:8000 there, http://10.0.0.7:8000 here" in warning
    assert "b2 (http://10.0.0.1:8000) is not serving there: drained" in warning
    assert "kvroute:{fleet}:members" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvroute.fleet"):
        await replica(redis_url)  # the same fleet: nothing to say
    assert not caplog.records
