"""The Responses API through the router, with simulated vLLM servers and the official `openai`
client: chains by `previous_response_id` reach the server that holds them (and fail about half
the time without the router), stream stats the client accepts, errors, losing an owner with and
without RESPONSES_HISTORY, and two router processes sharing Redis."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from harness.router import RouterProcess
from harness.simulator import SimulatorThread
from tests.conftest import RouterServer, running_router, running_simulators, wait_for

CONVERSATIONS, TURNS = 8, 5
SIM = {"base_ttft_s": 0.001, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 5000.0}


@pytest.fixture
def two_sims() -> Iterator[list[SimulatorThread]]:
    with running_simulators(2, **SIM) as sims:
        yield sims


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def opening(n: int) -> str:
    return f"Conversation {n}: tell me about topic {n}. " * 3


def served_by(sims: list[SimulatorThread]) -> dict[str, str]:
    """response id -> simulator url, from the simulators' own stores."""
    return {rid: sim.url for sim in sims for rid in sim.app.responses.items}


def post_json(url: str, body: Any) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    return _open(request)


def _open(request: urllib.request.Request) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def chains(clients: list[openai.OpenAI], *, stream: bool) -> tuple[int, int]:
    """8 conversations x 5 turns, turn i sent through clients[i % len]; (succeeded, failed)."""
    ok = failed = 0
    last: dict[int, str | None] = dict.fromkeys(range(CONVERSATIONS))
    for turn in range(TURNS):
        client = clients[turn % len(clients)]
        for n in range(CONVERSATIONS):
            text = opening(n) if last[n] is None else f"turn {turn}"
            try:
                last[n] = send(client, text, last[n], stream=stream)
                ok += 1
            except openai.NotFoundError:
                failed += 1
    return ok, failed


def send(client: openai.OpenAI, text: str, previous: str | None, *, stream: bool) -> str:
    extra: dict[str, Any] = {"previous_response_id": previous} if previous else {}
    if not stream:
        response = client.responses.create(
            model="sim-model", input=text, max_output_tokens=4, **extra
        )
        return str(response.id)
    with client.responses.stream(
        model="sim-model", input=text, max_output_tokens=4, **extra
    ) as events:
        return str(events.get_final_response().id)


@pytest.mark.parametrize("stream", [False, True])
def test_chains_reach_their_owner_through_the_router(
    two_sims: list[SimulatorThread], *, stream: bool
) -> None:
    with running_router([s.url for s in two_sims], served_model="sim-model") as router:
        ok, failed = chains([client_for(router.url)], stream=stream)
    assert (ok, failed) == (CONVERSATIONS * TURNS, 0)
    # Round robin straight to the servers: a turn lands where its previous response is not.
    direct_ok, direct_failed = chains([client_for(s.url) for s in two_sims], stream=stream)
    assert direct_failed >= CONVERSATIONS * (TURNS - 1) // 2
    assert direct_ok + direct_failed == CONVERSATIONS * TURNS


def test_new_conversations_are_sticky_and_spread(two_sims: list[SimulatorThread]) -> None:
    with running_router([s.url for s in two_sims], served_model="sim-model") as router:
        client = client_for(router.url)
        ids = [client.responses.create(model="sim-model", input=opening(n)).id for n in range(8)]
        again = [client.responses.create(model="sim-model", input=opening(n)).id for n in range(8)]
    where = served_by(two_sims)
    assert [where[a] for a in ids] == [where[b] for b in again]  # same opening, same server
    assert len({where[a] for a in ids}) == 2


def test_headers_stats_and_errors(router: RouterServer) -> None:
    url = router.url + "/v1/responses"
    status, headers, body = post_json(url, {"input": "hello", "max_output_tokens": 2})
    assert status == 200
    assert headers["x-router-backend"].startswith("b")
    assert headers["x-router-cache-outcome"] in ("hit", "miss", "spill")
    rid = body["id"]
    get = urllib.request.Request(f"{router.url}/v1/responses/{rid}")
    status, headers, fetched = _open(get)
    assert (status, fetched["id"]) == (200, rid)
    with urllib.request.urlopen(router.url + "/metrics", timeout=5) as reply:
        described = json.loads(reply.read())["responses"]
    assert described == {"kind": "memory", "owners": 1, "turns": 0, "turn_bytes": 0}
    status, _, cancel = post_json(f"{router.url}/v1/responses/{rid}/cancel", b"")
    assert status == 400  # vLLM's answer for a finished response, relayed
    assert cancel["error"]["message"] == "Cannot cancel a synchronous response."
    for path, payload, want in [
        ("", {"input": "x", "previous_response_id": "resp_nope"}, (404, "response_not_found")),
        ("", {"input": "x", "previous_response_id": "r" * 10_000}, (404, "response_not_found")),
        ("/resp_nope", None, (404, "response_not_found")),
        ("/resp_nope/cancel", b"", (404, "response_not_found")),
        ("", b"{nope", (400, None)),
        ("", {"model": "sim-model"}, (400, None)),
        ("", {"model": "nope", "input": "x"}, (404, "model_not_found")),
    ]:
        if payload is None:
            status, _, err = _open(urllib.request.Request(url + path))
        else:
            status, _, err = post_json(url + path, payload)
        assert status == want[0], (path, payload, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}
        if want[1] is not None:
            assert err["error"]["code"] == want[1]


def test_stream_stats_with_the_openai_client(router: RouterServer) -> None:
    client = client_for(router.url)
    stream = client.responses.create(
        model="sim-model", input="hello", max_output_tokens=3, stream=True
    )
    events = list(stream)
    assert events[0].type == "response.created"
    assert events[-2].type == "response.completed"
    # An event type the client does not know comes through as a plain object.
    stats: Any = events[-1]
    assert stats.type == "router.stream_stats"
    figures = stats.router_stats
    assert figures["completion_tokens"] == 3
    assert figures["token_source"] == "backend"
    assert figures["backend"].startswith("b")
    assert figures["ttft_ms"] is not None
    with client.responses.stream(model="sim-model", input="hi", max_output_tokens=2) as helper:
        kinds: list[str] = [e.type for e in helper]
        assert helper.get_final_response().usage is not None
    assert kinds[-1] == "router.stream_stats"


async def test_async_client_stream_and_not(router: RouterServer) -> None:
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    first = await client.responses.create(model="sim-model", input="hello", max_output_tokens=2)
    stream = await client.responses.create(
        model="sim-model",
        input="more",
        previous_response_id=first.id,
        max_output_tokens=2,
        stream=True,
    )
    kinds: list[str] = [event.type async for event in stream]
    assert "response.completed" in kinds
    assert kinds[-1] == "router.stream_stats"
    async with client.responses.stream(
        model="sim-model", input="again", previous_response_id=first.id, max_output_tokens=2
    ) as helper:
        final = await helper.get_final_response()
    assert final.previous_response_id == first.id
    await client.close()


def owners_of(sims: list[SimulatorThread], ids: list[str]) -> list[str]:
    where = served_by(sims)
    return [where[i] for i in ids]


def assert_lost(answer: tuple[int, dict[str, str], Any]) -> None:
    status, _, body = answer
    assert (status, body["error"]["code"]) == (410, "response_lost"), body


@pytest.mark.parametrize("history", [True, False])
@pytest.mark.parametrize("loss", ["stopped", "restarted"])
def test_losing_the_owner(two_sims: list[SimulatorThread], *, history: bool, loss: str) -> None:
    """The turns after the loss go out before the router notices it (metrics scraped each
    second); the turns after those, once it has: a response stored on the restarted server in
    between is still its, not lost a second time."""
    with running_router(
        [s.url for s in two_sims],
        served_model="sim-model",
        responses_history=history,
        metrics_interval_s=1.0,
    ) as router:
        client = client_for(router.url)
        last = [send(client, opening(n), None, stream=False) for n in range(8)]
        last = [send(client, "second", rid, stream=n % 2 == 1) for n, rid in enumerate(last)]
        victim = two_sims[0]
        lost = [i for i, url in enumerate(owners_of(two_sims, last)) if url == victim.url]
        assert lost  # both servers hold some
        b0 = router.router.pool.get("b0")
        if loss == "stopped":
            victim.stop()
        else:
            post_json(victim.url + "/sim/control", {"restart": True})
        gone = f"{router.url}/v1/responses/{last[lost[0]]}"
        assert_lost(_open(urllib.request.Request(gone)))  # before the router saw the loss
        followed: list[str] = []
        for n, rid in enumerate(last):
            if n not in lost:
                send(client, "third", rid, stream=False)
                continue
            if history:
                status, headers, body = post_json(
                    router.url + "/v1/responses",
                    {"input": "third", "previous_response_id": rid, "max_output_tokens": 2},
                )
                assert status == 200
                assert headers["x-router-cache-outcome"] == "reassigned"
                # The new server saw the whole conversation: both earlier turns and this one.
                assert body["usage"]["input_tokens"] > 40
                followed.append(body["id"])
            else:
                with pytest.raises(openai.APIStatusError) as caught:
                    send(client, "third", rid, stream=n % 2 == 0)
                assert caught.value.status_code == 410
                assert "response_lost" in str(caught.value.body)
                assert "RESPONSES_HISTORY" in caught.value.message
        if loss == "stopped":
            wait_for(lambda: not b0.healthy)
        else:
            wait_for(lambda: b0.generation == 1)
        for n, rid in enumerate(followed):
            assert send(client, "fourth", rid, stream=n % 2 == 0)
        assert_lost(_open(urllib.request.Request(gone)))  # and after
        outcomes = router.router.metrics.outcomes
        assert outcomes["reassigned"] == (len(lost) if history else 0)


def test_two_routers_sharing_redis(two_sims: list[SimulatorThread], redis_url: str) -> None:
    env = {
        "BACKEND_URLS": ",".join(s.url for s in two_sims),
        "SERVED_MODEL": "sim-model",
        "REDIS_URL": redis_url,
        "HEALTH_INTERVAL_S": "0.2",
    }
    with RouterProcess(env, name="router-a") as a, RouterProcess(env, name="router-b") as b:
        ok, failed = chains([client_for(a.url), client_for(b.url)], stream=False)
        stream_ok, stream_failed = chains([client_for(b.url), client_for(a.url)], stream=True)
    assert (ok, failed) == (CONVERSATIONS * TURNS, 0)
    assert (stream_ok, stream_failed) == (CONVERSATIONS * TURNS, 0)


def test_a_busy_owner_is_not_a_lost_one(two_sims: list[SimulatorThread]) -> None:
    """The owner at its in-flight limit: 429 to retry, not 410 (and no move elsewhere)."""
    with running_router(
        [s.url for s in two_sims],
        served_model="sim-model",
        max_in_flight_per_backend=1,
        responses_history=True,
    ) as router:
        client = client_for(router.url)
        first = send(client, "hello there", None, stream=False)
        owner = next(s for s in two_sims if first in s.app.responses.items)
        post_json(owner.url + "/sim/control", {"delay_s": 1.0})
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(send, client, "slow", first, stream=True)
            wait_for(lambda: sum(b.in_flight for b in router.router.pool.backends) == 1)
            with pytest.raises(openai.RateLimitError):
                send(client, "again", first, stream=False)
            with pytest.raises(openai.RateLimitError):
                client.responses.retrieve(first)
            assert slow.result(timeout=10).startswith("resp_")
        post_json(owner.url + "/sim/control", {"delay_s": 0})
        assert router.router.metrics.outcomes["reassigned"] == 0


def test_router_keys_and_tenant_rates_apply(two_sims: list[SimulatorThread]) -> None:
    with running_router(
        [s.url for s in two_sims],
        served_model="sim-model",
        router_api_keys=["k1=alice"],
        tenant_rpm=2,
    ) as router:
        anonymous = client_for(router.url)
        with pytest.raises(openai.AuthenticationError):
            anonymous.responses.create(model="sim-model", input="hi")
        alice = openai.OpenAI(base_url=router.url + "/v1", api_key="k1", max_retries=0)
        first = alice.responses.create(model="sim-model", input="hi", max_output_tokens=2)
        assert alice.responses.retrieve(first.id).id == first.id
        with pytest.raises(openai.RateLimitError):  # the third request of the minute
            alice.responses.create(model="sim-model", input="again", max_output_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            anonymous.responses.retrieve(first.id)


def test_a_restarted_router_finds_the_owner_again(two_sims: list[SimulatorThread]) -> None:
    """Without Redis the owner map dies with the router; vLLM still holds the responses, and the
    next router asks the backends which one does."""
    urls = [s.url for s in two_sims]
    with running_router(urls, served_model="sim-model") as before:
        last = [send(client_for(before.url), opening(n), None, stream=False) for n in range(6)]
    with running_router(urls, served_model="sim-model") as after:
        client = client_for(after.url)
        for n, rid in enumerate(last):
            assert send(client, "next", rid, stream=n % 2 == 1)
        assert client.responses.retrieve(last[0]).id == last[0]
        assert after.router.responses.describe()["owners"] == 2 * len(last)


def test_stats_can_be_left_out(router: RouterServer) -> None:
    request = urllib.request.Request(
        router.url + "/v1/responses",
        data=json.dumps({"input": "hi", "max_output_tokens": 2, "stream": True}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Router-Stream-Stats": "0"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["x-router-backend"].startswith("b")
        events = [e for e in response.read().split(b"\n\n") if e]
    assert events[-1].startswith(b"event: response.completed\n")
    assert not any(b"router.stream_stats" in e for e in events)
