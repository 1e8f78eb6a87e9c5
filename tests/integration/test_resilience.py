"""Faults, admission and security end to end: real servers on loopback, no request lost."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import aiohttp
import httpx
import orjson

from app.simulator.config import SimConfig
from app.stream_stats import read_stats
from harness.simulator import SimulatorThread
from tests.conftest import RouterServer, running_router, running_simulators, wait_for
from tests.integration.router_process import RouterProcess

FAST: dict[str, Any] = {
    "base_ttft_s": 0.001,
    "prefill_s_per_token": 0.0,
    "decode_tokens_per_s": 1000.0,
}


def body(i: int, max_tokens: int = 8, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"request {i}"}],
    }


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


async def stream_once(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, list[bytes], float]:
    start = time.monotonic()
    async with session.post(
        f"{url}/v1/chat/completions", json=payload, headers=headers or {}
    ) as resp:
        raw = await resp.read()
    return resp.status, events_of(raw), time.monotonic() - start


def test_mid_stream_failure_ends_with_error_event_stats_and_done() -> None:
    with (
        running_simulators(1, **FAST) as sims,
        running_router([sims[0].url], served_model="sim-model") as router,
    ):
        httpx.post(f"{sims[0].url}/sim/control", json={"fail_mid_stream_after": 3})
        resp = httpx.post(
            f"{router.url}/v1/chat/completions", json=body(0, max_tokens=50), timeout=10
        )
        events = events_of(resp.content)
        assert resp.status_code == 200
        assert events[-1] == b"data: [DONE]"
        stats = read_stats(events[-2])
        assert stats is not None
        assert "error" in stats
        error = orjson.loads(events[-3].removeprefix(b"data: "))
        assert error["error"]["type"] == "upstream_error"
        assert "mid-stream" in error["error"]["message"]
        assert httpx.get(f"{router.url}/metrics").json()["errors"].get("UpstreamBroken") == 1


def test_backend_killed_under_load_loses_no_unstarted_request_and_comes_back() -> None:
    with (
        running_simulators(
            3, decode_tokens_per_s=200.0, base_ttft_s=0.002, prefill_s_per_token=0.0
        ) as sims,
        running_router(
            [s.url for s in sims], served_model="sim-model", retries=2, unhealthy_after_failures=1
        ) as router,
    ):
        victim = sims[1]
        port = victim.port
        results: list[tuple[int, list[bytes], float]] = []

        async def load() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

                async def one(i: int) -> None:
                    results.append(await stream_once(session, router.url, body(i, max_tokens=20)))

                tasks = []
                for i in range(120):
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(0.01)
                    if i == 40:
                        await asyncio.to_thread(victim.stop)
                await asyncio.gather(*tasks)

        asyncio.run(load())
        assert len(results) == 120
        ok = [r for r in results if r[0] == 200 and r[1][-1] == b"data: [DONE]"]
        bad = [(r[0], r[1][-3:]) for r in results if r not in ok]
        assert len(ok) == 120, bad  # no hang, every stream terminated properly
        broken = [r for r in ok if any(b'"upstream_error"' in e for e in r[1])]
        complete = [r for r in ok if not any(b'"error"' in e for e in r[1])]
        # Only streams that had started on the victim may end with an error event.
        assert len(broken) + len(complete) == 120
        assert len(broken) <= 40
        assert all(len([e for e in r[1] if b'"content"' in e]) >= 20 for r in complete)
        # Revive it on the same port: the health probe brings it back and it gets traffic again.
        revived = SimulatorThread(SimConfig(model="sim-model", **FAST), port=port)
        revived.start()
        try:
            wait_for(lambda: router.router.pool.backends[1].healthy, timeout_s=10)
            for i in range(30):
                httpx.post(
                    f"{router.url}/v1/chat/completions",
                    json=body(1000 + i, stream=False),
                    timeout=10,
                )
            assert httpx.get(f"{revived.url}/sim/stats").json()["completed"] > 0
        finally:
            revived.stop()


def test_circuit_breaker_skips_a_backend_that_keeps_failing() -> None:
    with (
        running_simulators(2, **FAST) as sims,
        running_router(
            [s.url for s in sims],
            served_model="sim-model",
            breaker_failures=2,
            breaker_cooldown_s=60,
            retries=1,
        ) as router,
    ):
        httpx.post(f"{sims[0].url}/sim/control", json={"fail_next": 1000, "status": 503})
        for i in range(20):
            assert (
                httpx.post(
                    f"{router.url}/v1/chat/completions", json=body(i, stream=False)
                ).status_code
                == 200
            )
        failed = httpx.get(f"{sims[0].url}/sim/stats").json()["failed"]
        assert failed == 2  # tried twice, then skipped although its /health still answers 200
        assert not router.router.pool.backends[0].healthy


def test_flooding_tenant_does_not_starve_another() -> None:
    with (
        running_simulators(
            1, decode_tokens_per_s=100.0, base_ttft_s=0.001, prefill_s_per_token=0.0
        ) as sims,
        running_router([sims[0].url], served_model="sim-model", max_in_flight=4) as router,
    ):

        async def run() -> tuple[list[float], list[float]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                flood = [
                    asyncio.create_task(
                        stream_once(
                            session, router.url, body(i, max_tokens=10), {"X-Tenant-ID": "flood"}
                        )
                    )
                    for i in range(60)
                ]
                await asyncio.sleep(0.2)
                quiet = []
                for i in range(5):
                    status, events, took = await stream_once(
                        session, router.url, body(i, max_tokens=10), {"X-Tenant-ID": "quiet"}
                    )
                    assert status == 200
                    assert events[-1] == b"data: [DONE]"
                    quiet.append(took)
                flooded = await asyncio.gather(*flood)
                assert all(s == 200 for s, _, _ in flooded)
                return quiet, [t for _, _, t in flooded]

        quiet, flooded = asyncio.run(run())
        # 60 flood requests at 4 in flight take ~1.5 s of queueing; the quiet tenant waits for about
        # one slot each time (10 tokens at 100 tok/s = 0.1 s), not for the whole flood.
        assert max(quiet) < 0.6, quiet
        assert max(flooded) > 1.0, max(flooded)
        snapshot = httpx.get(f"{router.url}/metrics").json()["admission"]
        assert snapshot["admitted_after_wait"] > 0
        assert snapshot["queue_ms_max"] > 0


def test_queue_full_is_429_with_retry_after() -> None:
    with (
        running_simulators(
            1, decode_tokens_per_s=50.0, **{"base_ttft_s": 0.001, "prefill_s_per_token": 0.0}
        ) as sims,
        running_router(
            [sims[0].url], served_model="sim-model", max_in_flight=1, max_queue=1
        ) as router,
    ):

        async def run() -> Counter[int]:
            async with aiohttp.ClientSession() as session:
                results = await asyncio.gather(
                    *(stream_once(session, router.url, body(i, max_tokens=10)) for i in range(6))
                )
                return Counter(s for s, _, _ in results)

        statuses = asyncio.run(run())
        assert statuses[200] == 2
        assert statuses[429] == 4
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=body(9, max_tokens=40))
        assert resp.status_code == 200


def test_router_api_keys_and_bound_tenants() -> None:
    with (
        running_simulators(1, **FAST) as sims,
        running_router(
            [sims[0].url], served_model="sim-model", router_api_keys=["open-key", "acme-key=acme"]
        ) as router,
    ):
        url = f"{router.url}/v1/chat/completions"
        assert httpx.post(url, json=body(0)).status_code == 401
        bad = httpx.post(url, json=body(0), headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert bad.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{router.url}/v1/models").status_code == 401
        resp = httpx.post(
            url, json=body(0), headers={"Authorization": "Bearer acme-key", "X-Tenant-ID": "evil"}
        )
        stats = orjson.loads(events_of(resp.content)[-2].split(b"data: ", 1)[1])["router_stats"]
        assert stats["tenant"] == "acme"  # the key's tenant, not the header's
        resp = httpx.post(
            url, json=body(0), headers={"Authorization": "Bearer open-key", "X-Tenant-ID": "t9"}
        )
        assert (
            orjson.loads(events_of(resp.content)[-2].split(b"data: ", 1)[1])["router_stats"][
                "tenant"
            ]
            == "t9"
        )
        # The router key is never passed on to vLLM, and never shown.
        seen = httpx.get(f"{sims[0].url}/sim/stats").json()["log"]
        assert all("key" not in (r["headers"].get("authorization") or "") for r in seen)
        for path in ("/architecture", "/metrics", "/health"):
            text = httpx.get(f"{router.url}{path}").text
            assert "acme-key" not in text
            assert "open-key" not in text


def test_tenant_cache_salt_isolates_tenants() -> None:
    prompt = {
        "model": "sim-model",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": "Shared long prompt. " * 60},
            {"role": "user", "content": "hi"},
        ],
    }

    def cached_for(router: RouterServer, tenant: str) -> int:
        resp = httpx.post(
            f"{router.url}/v1/chat/completions", json=prompt, headers={"X-Tenant-ID": tenant}
        )
        return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    with running_simulators(1, **FAST) as sims:
        with running_router([sims[0].url], served_model="sim-model") as shared:
            cached_for(shared, "a")
            assert cached_for(shared, "b") > 0  # without salts, tenant b reuses a's blocks
        httpx.post(f"{sims[0].url}/sim/control", json={"reset": True})
        with running_router(
            [sims[0].url],
            served_model="sim-model",
            tenant_cache_salt=True,
            cache_salt_secret="s" * 32,
            trusted_proxies=[
                "127.0.0.1"
            ],  # the test client stands for the proxy setting the header
        ) as isolated:
            cached_for(isolated, "a")
            assert cached_for(isolated, "b") == 0
            assert cached_for(isolated, "a") > 0


def test_request_shape_limits() -> None:
    with (
        running_simulators(1, **FAST) as sims,
        running_router(
            [sims[0].url], served_model="sim-model", max_messages=3, max_tokens_cap=100
        ) as router,
    ):
        url = f"{router.url}/v1/chat/completions"
        many = {**body(0), "messages": [{"role": "user", "content": "x"}] * 4}
        assert httpx.post(url, json=many).json()["error"]["param"] == "messages"
        resp = httpx.post(url, json={**body(0), "max_tokens": 101})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "max_tokens"


def test_sigterm_lets_open_streams_finish() -> None:
    with running_simulators(
        1, decode_tokens_per_s=50.0, base_ttft_s=0.001, prefill_s_per_token=0.0
    ) as sims:
        router = RouterProcess(
            {"BACKEND_URLS": sims[0].url, "SERVED_MODEL": "sim-model", "SHUTDOWN_GRACE_S": "10"}
        ).start()
        out: dict[str, Any] = {}

        def long_stream() -> None:
            resp = httpx.post(
                f"{router.url}/v1/chat/completions", json=body(0, max_tokens=60), timeout=30
            )
            out["events"] = events_of(resp.content)

        t = threading.Thread(target=long_stream)
        t.start()
        wait_for(lambda: httpx.get(f"{sims[0].url}/sim/stats").json()["running"] == 1)
        assert router.proc is not None
        os.killpg(router.proc.pid, signal.SIGTERM)
        t.join(timeout=30)
        assert router.proc.wait(timeout=30) == 0
        events = out["events"]
        assert events[-1] == b"data: [DONE]"
        assert not any(b'"error"' in e for e in events)
        assert len([e for e in events if b'"content":"tok' in e]) == 60


def test_liveness_stays_up_when_the_fleet_is_down() -> None:
    with (
        running_simulators(1, **FAST) as sims,
        running_router([sims[0].url], served_model="sim-model") as router,
    ):
        httpx.post(f"{sims[0].url}/sim/control", json={"healthy": False})
        wait_for(lambda: httpx.get(f"{router.url}/health").status_code == 503)
        assert httpx.get(f"{router.url}/live").status_code == 200
        assert httpx.get(f"{router.url}/ready").status_code == 503


def test_a_client_that_leaves_while_queued_is_counted_and_frees_its_place() -> None:
    with (
        running_simulators(
            1, decode_tokens_per_s=50.0, base_ttft_s=0.001, prefill_s_per_token=0.0
        ) as sims,
        running_router([sims[0].url], served_model="sim-model", max_in_flight=1) as router,
    ):

        async def run() -> None:
            async with aiohttp.ClientSession() as session:
                holder = asyncio.create_task(
                    stream_once(session, router.url, body(0, max_tokens=30))
                )
                await asyncio.sleep(0.1)
                leaver = asyncio.create_task(
                    stream_once(session, router.url, body(1, max_tokens=5))
                )
                await asyncio.sleep(0.2)
                assert router.router.admission.waiting == 1
                leaver.cancel()
                await asyncio.gather(leaver, return_exceptions=True)
                # It leaves the queue at once, while the holder still streams.
                for _ in range(50):
                    if router.router.admission.waiting == 0:
                        break
                    await asyncio.sleep(0.005)
                assert router.router.admission.waiting == 0
                assert not holder.done()
                status, events, _ = await holder
                assert status == 200
                assert events[-1] == b"data: [DONE]"

        asyncio.run(run())
        wait_for(
            lambda: router.router.admission.waiting == 0 and router.router.admission.in_flight == 0
        )
        metrics = httpx.get(f"{router.url}/metrics").json()
        assert metrics["client_disconnects"] == 1
        assert metrics["requests"]["by_endpoint_status"].get("chat 499") == 1
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=body(2, stream=False))
        assert resp.status_code == 200
        # The leaver's request never reached the backend: only the holder's and the last one.
        assert httpx.get(f"{sims[0].url}/sim/stats").json()["requests"]["chat"] == 2
