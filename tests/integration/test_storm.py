"""The storm: every limit on, overload, clients leaving at every stage, bad and trickled bodies and
a backend whose 503s break mid-body, all at once for about ten seconds. Then the state left
behind: nothing held, nothing running on any backend, and the router still serving."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from tests.conftest import running_router, running_simulators, wait_for
from tests.integration.hostile_backend import HostileBackend

# One heavy tenant runs past its RPM from about 530 valid bodies in the storm, a sixth of what a
# 2-core machine sends (about 3,100), while the others stay under it up to about 1.4 times that,
# so most requests still meet the admission queue. With four even tenants and 400 RPM the limit
# was met only on a fast enough machine (one slow CI run: 913 rejections, none by the RPM).
TENANTS = {"acme": 0.76, "globex": 0.08, "initech": 0.08, "umbrella": 0.08}
TENANT_RPM = 300
STORM_S = 10.0
BODY_TIMEOUT_S = 1.5  # past the loop stalls a loaded 2-core machine shows (up to 1.4 s seen)
CLIENTS = 48


def chat(i: int, *, stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"storm request {i} " + "x" * (i % 50)}],
    }


def raw_request(port: int, body: bytes, tenant: str, length: int | None = None) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Tenant-ID: {tenant}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    ).encode() + body


# Behaviours whose whole, valid body reaches the rate check (the others fail before it).
VALID_BODIES = {"stream", "whole", "leave_queued", "leave_before_headers", "leave_mid_stream"}


class Storm:
    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.rng = random.Random(seed)
        self.statuses: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.unfinished_streams: list[bytes] = []
        self.broken: list[str] = []
        self.valid_bodies: Counter[str] = Counter()  # by tenant: those that meet the rate check
        self.n = 0

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            end = time.monotonic() + STORM_S
            await asyncio.gather(*(self.client(session, end) for _ in range(CLIENTS)))

    async def client(self, session: aiohttp.ClientSession, end: float) -> None:
        behaviours = [
            (self.stream, 30),
            (self.whole, 20),
            (self.leave_queued, 10),
            (self.leave_before_headers, 10),
            (self.leave_mid_stream, 10),
            (self.leave_during_upload, 5),
            (self.trickle_body, 3),
            (self.bad_json, 10),
            (self.bad_field, 5),
        ]
        while time.monotonic() < end:
            self.n += 1
            behaviour = self.rng.choices(
                [b for b, _ in behaviours], weights=[w for _, w in behaviours]
            )[0]
            self.kinds[behaviour.__name__] += 1
            try:
                tenant = self.rng.choices(list(TENANTS), weights=list(TENANTS.values()))[0]
                self.valid_bodies[tenant] += behaviour.__name__ in VALID_BODIES
                await behaviour(session, self.n, tenant)
            except aiohttp.ClientError as exc:  # the router broke an answer: a failure to count
                self.broken.append(f"{behaviour.__name__}: {exc!r}"[:200])

    async def stream(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        async with session.post(
            f"{self.url}/v1/chat/completions",
            json=chat(i, stream=True),
            headers={"X-Tenant-ID": tenant},
        ) as resp:
            raw = await resp.read()
        self.statuses[resp.status] += 1
        if resp.status == 200 and not raw.endswith(b"data: [DONE]\n\n"):
            self.unfinished_streams.append(raw[-300:])

    async def whole(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        async with session.post(
            f"{self.url}/v1/chat/completions",
            json=chat(i, stream=False),
            headers={"X-Tenant-ID": tenant},
        ) as resp:
            await resp.read()
        self.statuses[resp.status] += 1

    async def leave_mid_stream(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        async with session.post(
            f"{self.url}/v1/chat/completions",
            json=chat(i, stream=True, max_tokens=64),
            headers={"X-Tenant-ID": tenant},
        ) as resp:
            self.statuses[resp.status] += 1
            if resp.status == 200:
                await resp.content.readany()
            resp.close()  # gone, with the stream still running

    async def _raw_then_leave(self, payload: bytes, after_s: float) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(after_s)
        writer.transport.abort()  # a reset, as a killed client leaves

    async def leave_queued(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        body = orjson.dumps(chat(i, stream=True))
        await self._raw_then_leave(raw_request(self.port, body, tenant), self.rng.uniform(0, 0.06))

    async def leave_before_headers(
        self, session: aiohttp.ClientSession, i: int, tenant: str
    ) -> None:
        body = orjson.dumps(chat(i, stream=False, max_tokens=40))
        await self._raw_then_leave(
            raw_request(self.port, body, tenant), self.rng.uniform(0.03, 0.12)
        )

    async def leave_during_upload(
        self, session: aiohttp.ClientSession, i: int, tenant: str
    ) -> None:
        body = orjson.dumps(chat(i, stream=True))
        await self._raw_then_leave(raw_request(self.port, body[:20], tenant, length=10_000), 0.01)

    async def trickle_body(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        """Half the body, then nothing: the router answers 408 once BODY_TIMEOUT_S is past."""
        body = orjson.dumps(chat(i, stream=True))
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw_request(self.port, body[: len(body) // 2], tenant, len(body)))
            head = await asyncio.wait_for(reader.readline(), BODY_TIMEOUT_S + 10)
            self.statuses[int(head.split()[1])] += 1
        finally:
            writer.transport.abort()

    async def bad_json(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        async with session.post(
            f"{self.url}/v1/chat/completions",
            data=b'{"model": "sim-model", "messages": [',
            headers={"X-Tenant-ID": tenant, "Content-Type": "application/json"},
        ) as resp:
            await resp.read()
        self.statuses[resp.status] += 1

    async def bad_field(self, session: aiohttp.ClientSession, i: int, tenant: str) -> None:
        async with session.post(
            f"{self.url}/v1/chat/completions",
            json={**chat(i, stream=True), "max_tokens": -1_000_000},
            headers={"X-Tenant-ID": tenant},
        ) as resp:
            await resp.read()
        self.statuses[resp.status] += 1


def held(url: str, sim_urls: list[str]) -> dict[str, Any]:
    """Everything that should be zero at rest, by name."""
    metrics = httpx.get(f"{url}/metrics").json()
    state = {
        "admission_in_flight": metrics["admission"]["in_flight"],
        "admission_waiting": metrics["admission"]["waiting"],
        "backend_in_flight": metrics["in_flight"],
        "body_bytes_held": metrics["bodies"]["held_bytes"],
        "tpm_refunds_pending": metrics["rates"].get("refunds_pending", 0),
    }
    for i, sim in enumerate(sim_urls):
        stats = httpx.get(f"{sim}/sim/stats").json()
        state[f"sim{i}_running_waiting"] = (stats["running"], stats["waiting"])
    return state


def at_rest(url: str, sim_urls: list[str]) -> None:
    def nothing_held() -> bool:
        state = held(url, sim_urls)
        return not any(
            v if isinstance(v, int) else sum(v.values() if isinstance(v, dict) else v)
            for v in state.values()
        )

    try:
        wait_for(nothing_held, timeout_s=10)
    except AssertionError:
        raise AssertionError(f"held at rest: {held(url, sim_urls)}") from None


@pytest.mark.parametrize("shared", ["memory", "redis"])
def test_storm_leaves_nothing_held_and_the_router_serving(
    shared: str, request: pytest.FixtureRequest
) -> None:
    """`redis`: ownership and tenant rate limits in a real Redis as well, so that clients leave
    during those calls too (and one tenant runs past its RPM)."""
    fast = {"base_ttft_s": 0.005, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 400.0}
    in_redis: dict[str, Any] = {}
    if shared == "redis":
        in_redis = {
            "redis_url": request.getfixturevalue("redis_url"),
            "tenant_rpm": TENANT_RPM,
            "tenant_tpm": 10_000_000,  # charged and given back on every request
            "trust_tenant_headers": True,
        }
    with (
        running_simulators(2, **fast) as sims,
        HostileBackend("broken_503") as broken,
        running_router(
            [s.url for s in sims] + [broken.url],
            served_model="sim-model",
            max_in_flight=6,
            queue_timeout_s=0.08,
            max_queue=64,
            retries=1,
            breaker_failures=3,
            breaker_cooldown_s=0.5,
            body_timeout_s=BODY_TIMEOUT_S,
            **in_redis,
        ) as router,
    ):
        storm = Storm(router.url, seed=19)
        asyncio.run(storm.run())
        print(f"storm: {sorted(storm.kinds.items())} -> statuses {sorted(storm.statuses.items())}")
        print(f"valid bodies by tenant: {sorted(storm.valid_bodies.items())}")
        sim_urls = [s.url for s in sims]
        at_rest(router.url, sim_urls)

        # What the clients saw: answers, 400s for bad bodies, 408s for trickled ones, 429s past
        # the queue; never a 5xx.
        assert not [s for s in storm.statuses if s >= 500], storm.statuses
        assert storm.broken == []
        assert storm.statuses[200] > 100
        assert storm.statuses[400] > 10
        assert storm.statuses[408] == storm.kinds["trickle_body"] > 0
        assert storm.statuses[429] > 0
        assert storm.unfinished_streams == []
        assert broken.posts > 0  # its broken 503s were met, and retried elsewhere

        metrics = httpx.get(f"{router.url}/metrics").json()
        assert metrics["client_disconnects"] > 20
        assert metrics["admission"]["rejected"].get("queue_timeout", 0) > 0
        assert metrics["admission"]["abandoned"] > 0  # clients that left while queued
        assert not metrics["errors"].get("InternalError"), metrics["errors"]
        if shared == "redis":  # both Redis paths were met, and a healthy Redis never failed
            # Past its budget and twice what refills in the storm (TENANT_RPM / 60 a second): room
            # for the storm's tail and for clients that left before the check.
            beyond = storm.valid_bodies["acme"] - TENANT_RPM * (1 + 2 * STORM_S / 60)
            assert beyond > 0, f"too few requests to meet the RPM: {storm.valid_bodies}"
            assert metrics["admission"]["rejected"].get("rate_rpm", 0) > 0
            assert metrics["ownership"]["state"] == "up"
            assert metrics["ownership"]["fallbacks"] == 0, metrics["ownership"]
            rates = metrics["rates"]
            assert rates["refunded_tokens"] > 0, rates
            assert rates["fallbacks"] == rates["refunds_dropped"] == 0, rates

        # Still serving: plain requests all succeed, and leave nothing behind either.
        with httpx.Client(timeout=10) as client:
            for i in range(20):
                resp = client.post(
                    f"{router.url}/v1/chat/completions", json=chat(i, stream=i % 2 == 0)
                )
                assert resp.status_code == 200, resp.text
        at_rest(router.url, sim_urls)
