"""`app.responses_path` against an in-process fake upstream: the look-ups of response ids the
router has no record of, which ask every backend, are bounded and come after the tenant's rate."""

from __future__ import annotations

import asyncio

import orjson

from app.responses_path import MAX_DISCOVERIES
from app.transport import MockRequest, MockResponse
from tests.test_handlers import app_with, sent_body


def asks_for_a_response(request: MockRequest) -> bool:
    return request.method == "GET" and "/v1/responses/" in request.url


async def test_lookups_of_unknown_ids_are_bounded() -> None:
    gate, all_asked = asyncio.Event(), asyncio.Event()
    asked = [0]

    async def held(request: MockRequest) -> MockResponse:
        asked[0] += 1
        if asked[0] == 2 * MAX_DISCOVERIES:  # every look-up is asking both backends
            all_asked.set()
        await gate.wait()
        return MockResponse(404)

    async with app_with(held, backends=2) as (client, services, _):
        waiting = [
            asyncio.create_task(client.get(f"/v1/responses/resp_{i}"))
            for i in range(MAX_DISCOVERIES)
        ]
        await asyncio.wait_for(all_asked.wait(), 10)
        refused = await client.get("/v1/responses/resp_one_more")
        assert refused.status_code == 429
        assert "look-ups of response ids" in refused.json()["error"]["message"]
        gate.set()
        answers = await asyncio.gather(*waiting)
        assert {a.status_code for a in answers} == {404}
        assert services.discovering == 0
        assert (await client.get("/v1/responses/resp_later")).status_code == 404


async def test_the_tenant_rate_comes_before_a_lookup() -> None:
    async def unknown(request: MockRequest) -> MockResponse:
        return MockResponse(404)

    async with app_with(unknown, backends=2, tenant_rpm=2, trust_tenant_headers=True) as (
        client,
        _,
        transport,
    ):
        statuses = [(await client.get(f"/v1/responses/resp_{i}")).status_code for i in range(4)]
        assert statuses == [404, 404, 429, 429]
        assert sum(map(asks_for_a_response, transport.requests)) == 2 * 2  # two look-ups only


async def test_the_cap_holds_when_a_turn_names_no_limit() -> None:
    async def answer(request: MockRequest) -> MockResponse:
        body = {"id": "resp_1", "object": "response", "status": "completed", "output": []}
        return MockResponse(200, {"content-type": "application/json"}, [orjson.dumps(body)])

    async with app_with(answer, max_tokens_cap=100) as (client, _, transport):
        resp = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert resp.status_code == 200
        assert sent_body(transport)["max_output_tokens"] == 100


async def test_a_turn_gets_back_the_tokens_it_did_not_use() -> None:
    """Charged its prompt and `max_output_tokens` up front, a turn gets back what vLLM's usage
    says it did not use: five turns of 800 pass a TPM of 2000, which two would empty."""

    async def answer(request: MockRequest) -> MockResponse:
        usage = {"input_tokens": 6, "output_tokens": 4, "total_tokens": 10}
        body = {"id": "resp_1", "object": "response", "status": "completed", "usage": usage}
        return MockResponse(200, {"content-type": "application/json"}, [orjson.dumps(body)])

    async with app_with(answer, tenant_tpm=2000, trust_tenant_headers=True) as (
        client,
        services,
        _,
    ):
        turn = {"model": "m", "input": "hi", "max_output_tokens": 800}
        statuses = [(await client.post("/v1/responses", json=turn)).status_code for _ in range(5)]
        assert statuses == [200] * 5
        assert services.rates.refunded == 5 * (800 + 1 - 10)  # a 1-token prompt, 10 used
