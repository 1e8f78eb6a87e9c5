"""The request path against an in-process fake upstream (`MockTransport`), through the ASGI app:
relay, retries and every release, with no network at all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from app.api import create_app
from app.backends import retained
from app.config import Settings
from app.errors import UpstreamBroken, UpstreamUnavailable
from app.handlers import tokens_used
from app.metrics import RequestRecord
from app.services import Services, build_services, running
from app.transport import MockRequest, MockResponse, MockTransport, sse_body
from tests.integration.hostile_backend import chat_chunks

CHAT: dict[str, Any] = {
    "model": "m",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "hello"}],
}
Answer = Callable[[MockRequest], Awaitable[MockResponse]]


def vllm(generate: Answer, max_model_len: int | None = None) -> Answer:
    """A fake vLLM: health, models and metrics answered; generation by `generate`."""
    card: dict[str, Any] = {"id": "m"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len

    async def handler(request: MockRequest) -> MockResponse:
        path = request.url.split("/", 3)[3]
        if path == "health":
            return MockResponse(200)
        if path == "v1/models":
            return MockResponse(200, chunks=[orjson.dumps({"data": [card]})])
        if path == "metrics":
            return MockResponse(200, chunks=[b"vllm:num_requests_waiting 0\n"])
        return await generate(request)

    return handler


async def stream_answer(request: MockRequest) -> MockResponse:
    events = [*chat_chunks(3, "m"), b"[DONE]"]
    return MockResponse(200, {"content-type": "text/event-stream"}, sse_body(events))


@asynccontextmanager
async def app_with(
    generate: Answer, backends: int = 1, max_model_len: int | None = None, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Services, MockTransport]]:
    transport = MockTransport(vllm(generate, max_model_len))
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        backend_urls=[f"http://b{i}.test:8000" for i in range(backends)],
        **settings,
    )
    services = build_services(s, transport=transport)
    app = create_app(s, services)
    async with running(services):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r")
        async with client:
            yield client, services, transport


def idle(services: Services) -> bool:
    return services.admission.in_flight == 0 and all(
        b.in_flight == 0 for b in services.pool.backends
    )


async def test_stream_is_relayed_with_stats_and_its_upstream_closed() -> None:
    async with app_with(stream_answer) as (client, services, transport):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = [e for e in resp.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert (
            orjson.loads(events[-2].split(b"data: ", 1)[1])["router_stats"]["completion_tokens"]
            == 3
        )
        sent = orjson.loads(transport.requests[-1].body or b"{}")
        assert sent["stream_options"] == {"include_usage": True}
        assert all(r.closed for r in transport.responses)
        assert idle(services)


async def test_retry_on_503_goes_to_the_other_backend_and_closes_the_first() -> None:
    calls: list[str] = []

    async def answer(request: MockRequest) -> MockResponse:
        calls.append(request.url)
        if len(calls) == 1:
            return MockResponse(503, chunks=[b'{"error": ', UpstreamBroken("reset")])
        return MockResponse(200, {"content-type": "application/json"}, [b'{"ok": true}'])

    async with app_with(answer, backends=2, retries=1) as (client, services, transport):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200
        assert resp.json() == {"ok": True}
        assert len({c.split("/")[2] for c in calls}) == 2
        assert (
            resp.headers["x-request-id"] + "-r1" == transport.requests[-1].headers["X-Request-Id"]
        )
        assert all(r.closed for r in transport.responses)
        assert idle(services)


async def test_connection_error_on_every_backend_is_a_502() -> None:
    async def refuse(request: MockRequest) -> MockResponse:
        raise UpstreamUnavailable("connection refused")

    async with app_with(refuse, backends=2, retries=1) as (client, services, _):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 502
        assert "unreachable" in resp.json()["error"]["message"]
        assert idle(services)


async def test_failure_mid_stream_is_an_error_event_then_stats_then_done() -> None:
    async def breaks(request: MockRequest) -> MockResponse:
        chunks = sse_body(chat_chunks(3, "m")[:3])
        return MockResponse(200, {}, [*chunks, b'data: {"partial', UpstreamBroken("reset by peer")])

    async with app_with(breaks) as (client, services, transport):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = [e for e in resp.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert b"reset by peer" in events[-3]
        assert b"partial" not in resp.content
        stats = orjson.loads(events[-2].split(b"data: ", 1)[1])["router_stats"]
        assert "error" in stats
        assert stats["token_source"] == "estimate"
        assert transport.responses[-1].closed
        assert idle(services)
        assert services.metrics.errors["UpstreamBroken"] == 1


async def test_oversized_whole_answer_is_a_502() -> None:
    async def big(request: MockRequest) -> MockResponse:
        return MockResponse(200, {}, [b"x" * 70_000, b"y" * 70_000])

    async with app_with(big, max_response_bytes=100_000) as (client, services, _):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 502
        assert "larger than" in resp.json()["error"]["message"]
        assert idle(services)


async def test_client_leaving_while_the_backend_prepares_closes_upstream() -> None:
    started = asyncio.Event()

    class Slow(MockResponse):
        async def read_chunk(self) -> bytes:
            started.set()
            await asyncio.sleep(30)
            return b""

    async def slow(request: MockRequest) -> MockResponse:
        return Slow(200, {})

    async with app_with(slow) as (client, services, transport):
        task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()  # httpx's ASGI transport then reports the disconnect
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(200):
            if idle(services) and transport.responses[-1].closed:
                break
            await asyncio.sleep(0.01)
        assert idle(services)
        assert transport.responses[-1].closed


async def test_passthrough_goes_through_rates_and_admission_and_counts_errors() -> None:
    gate = asyncio.Event()

    async def tokenize(request: MockRequest) -> MockResponse:
        if b"broken" in (request.body or b""):
            return MockResponse(200, {}, [b'{"tok', UpstreamBroken("reset")])
        await gate.wait()
        return MockResponse(200, {"content-type": "application/json"}, [b'{"count": 1}'])

    settings = {"tenant_rpm": 2, "trust_tenant_headers": True, "max_in_flight": 1}
    async with app_with(tokenize, **settings) as (client, services, _):
        body = {"model": "m", "prompt": "hi"}
        first = asyncio.create_task(
            client.post("/tokenize", json=body, headers={"X-Tenant-ID": "a"})
        )
        for _ in range(100):
            if services.admission.in_flight == 1:
                break
            await asyncio.sleep(0.01)
        assert services.admission.in_flight == 1  # the passthrough holds an admission slot
        queued = asyncio.create_task(
            client.post("/tokenize", json=body, headers={"X-Tenant-ID": "a"})
        )
        for _ in range(100):
            if services.admission.waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert services.admission.waiting == 1
        gate.set()
        assert (await first).status_code == 200
        assert (await queued).status_code == 200
        limited = await client.post("/tokenize", json=body, headers={"X-Tenant-ID": "a"})
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "rate_limit_error"
        broken = await client.post(
            "/tokenize", json={**body, "prompt": "broken"}, headers={"X-Tenant-ID": "b"}
        )
        assert broken.status_code == 502
        assert broken.json()["error"]["type"] == "upstream_error"
        requests = services.metrics.requests
        assert requests[("/tokenize", 200)] == 2
        assert requests[("/tokenize", 429)] == 1
        assert requests[("/tokenize", 502)] == 1
        assert idle(services)


async def whole_answer(request: MockRequest) -> MockResponse:
    return MockResponse(200, {"content-type": "application/json"}, [b'{"ok": true}'])


def sent_body(transport: MockTransport) -> dict[str, Any]:
    body = transport.requests[-1].body
    assert body is not None
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


@pytest.mark.parametrize(("context", "sent"), [(None, 100), (4096, 100), (64, 64)])
async def test_the_max_tokens_cap_holds_when_the_client_names_no_limit(
    context: int | None, sent: int
) -> None:
    """vLLM's default would be the rest of the context; it refuses a limit past max_model_len,
    so the cap sent is held to that when the backends report it."""
    async with app_with(whole_answer, max_model_len=context, max_tokens_cap=100) as (
        client,
        _,
        transport,
    ):
        unlimited = {k: v for k, v in CHAT.items() if k != "max_tokens"}
        assert (await client.post("/v1/chat/completions", json=unlimited)).status_code == 200
        assert sent_body(transport)["max_tokens"] == sent
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert sent_body(transport)["max_tokens"] == 5  # a limit under the cap is kept


async def test_tpm_charges_every_choice_and_an_unnamed_limit() -> None:
    """Charged up front: `max_tokens` for each of the `n` choices; without a limit, the rest of
    the context (max_model_len 4096 here), as vLLM would generate."""
    async with app_with(
        whole_answer, max_model_len=4096, tenant_tpm=2000, trust_tenant_headers=True
    ) as (client, _, _transport):
        for tenant, body, passes in [
            ("n", {**CHAT, "n": 4, "max_tokens": 300}, 1),  # 1200 + prompt each
            # ~4096: past the whole budget, so it passes only on a full bucket (then empties it)
            ("unnamed", {k: v for k, v in CHAT.items() if k != "max_tokens"}, 1),
            ("named", {**CHAT, "max_tokens": 600}, 3),  # 194 left: 12 s from the 4th
        ]:
            statuses = [
                (
                    await client.post(
                        "/v1/chat/completions", json=body, headers={"X-Tenant-ID": tenant}
                    )
                ).status_code
                for _ in range(passes + 1)
            ]
            assert statuses == [200] * passes + [429], (tenant, statuses)


@pytest.mark.parametrize(
    ("fields", "used"),
    [
        ({}, 0),  # never reached a backend (refused, queued, or every attempt failed)
        ({"backend": "b0", "status": 400}, 0),  # the backend's error answer
        ({"backend": "b0", "status": 200, "prompt_tokens": 7, "completion_tokens": 3}, 10),
        ({"backend": "b0", "prompt_tokens": 7, "completion_tokens": 1}, 8),  # a stream cut short
        ({"backend": "b0"}, 500),  # gone before its whole answer: unknown, the charge stands
    ],
)
def test_what_a_request_used_of_its_charge(fields: dict[str, Any], used: int) -> None:
    assert tokens_used(RequestRecord(**{"endpoint": "chat", "status": 0, **fields}), 500) == used


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


async def test_tpm_gives_back_what_a_request_did_not_use() -> None:
    """Each request is charged its most up front (prompt + 600 here) and, when it ends, gets back
    what it did not use: vLLM's usage, or all of it for a backend's error. A request in flight holds its whole charge, and a client gone before
    its whole answer came keeps it (its use cannot be known)."""
    release, all_held = asyncio.Event(), asyncio.Event()
    held = 0

    async def answer(request: MockRequest) -> MockResponse:
        nonlocal held
        sent = orjson.loads(request.body or b"{}")
        if sent.get("stream"):
            return await stream_answer(request)
        if sent["max_tokens"] == 1500:
            return MockResponse(400, chunks=[b'{"error": {"message": "no"}}'])
        if sent["max_tokens"] == 601:
            held += 1
            if held == 3:
                all_held.set()
            await release.wait()
        body = {"choices": [{"message": {"content": "hi"}}], "usage": USAGE}
        return MockResponse(200, {"content-type": "application/json"}, [orjson.dumps(body)])

    async with app_with(answer, tenant_tpm=2000, trust_tenant_headers=True) as (
        client,
        services,
        _,
    ):

        async def post(body: dict[str, Any], tenant: str = "t") -> int:
            headers = {"X-Tenant-ID": tenant}
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            return resp.status_code

        # Without the give-back, the fourth would be refused (3 x ~600 of 2000).
        assert [await post({**CHAT, "max_tokens": 600}) for _ in range(10)] == [200] * 10
        per_request = services.rates.refunded / 10
        assert per_request == 600 + 2 - 15  # the charge (600 and a 2-token prompt) less usage

        # In flight, each holds its charge: three fill the budget, the fourth is refused.
        waiting = [asyncio.create_task(post({**CHAT, "max_tokens": 601})) for _ in range(3)]
        await asyncio.wait_for(all_held.wait(), 10)
        assert await post({**CHAT, "max_tokens": 600}) == 429
        release.set()
        assert await asyncio.gather(*waiting) == [200] * 3
        assert await post({**CHAT, "max_tokens": 600}) == 200

        # A backend's error answer costs nothing: the whole budget may go again at once.
        before = services.rates.refunded
        assert await post({**CHAT, "max_tokens": 1500}, "errors") == 400
        assert services.rates.refunded - before == 1500 + 2
        assert await post({**CHAT, "max_tokens": 1400}, "errors") == 200

        # A stream: its usage chunk (7 + 3) is its use.
        before = services.rates.refunded
        assert await post({**CHAT, "max_tokens": 600, "stream": True}, "streams") == 200
        assert services.rates.refunded - before == 602 - 10
        assert services.rates.describe()["refunded_tokens"] == services.rates.refunded
        prom = (await client.get("/metrics", headers={"accept": "text/plain"})).text
        assert f"\nkvroute_tpm_refunded_tokens_total {float(services.rates.refunded)}\n" in prom


def usage_answer(cached: list[int | None]) -> Answer:
    """A fake vLLM whose n-th answer (stream or whole) reports `cached[n]` cached tokens of
    a 100-token prompt (None: no prompt_tokens_details, as without the vLLM flag)."""

    async def generate(request: MockRequest) -> MockResponse:
        figure = cached.pop(0)
        usage: dict[str, Any] = {"prompt_tokens": 100, "completion_tokens": 3}
        if figure is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": figure}
        if orjson.loads(request.body or b"{}").get("stream"):
            events = [*chat_chunks(3, "m")[:-1], orjson.dumps({"choices": [], "usage": usage})]
            return MockResponse(
                200, {"content-type": "text/event-stream"}, sse_body([*events, b"[DONE]"])
            )
        body = {"choices": [{"message": {"content": "ok"}}], "usage": usage}
        return MockResponse(200, chunks=[orjson.dumps(body)])

    return generate


@pytest.mark.parametrize("stream", [True, False])
async def test_answers_to_an_owned_conversation_measure_what_its_backend_kept(
    stream: bool,
) -> None:
    # The first turn has no owner (nothing to measure); the next two expect the 100 of their
    # prompt that the backend saw (of the first's 103, prompt and answer) and find 50, then 103
    # (more than expected: counted as all of it).
    async with app_with(usage_answer([0, 50, 103])) as (client, services, _):
        for _ in range(3):
            resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert resp.status_code == 200
        backend = services.pool.get("b0")
        expected = retained(retained(1.0, 100, 50), 100, 103)
        assert backend.retention == pytest.approx(expected)
        health = (await client.get("/health")).json()
        assert health["backends"][0]["kv_retention"] == round(expected, 4)
        assert idle(services)


async def test_a_backend_that_reports_no_cached_tokens_is_not_judged() -> None:
    async with app_with(usage_answer([None, None, None])) as (client, services, _):
        for stream in (True, False, True):
            resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert resp.status_code == 200
        assert services.pool.get("b0").retention == 1.0
        assert (await client.get("/health")).json()["backends"][0]["kv_retention"] is None
