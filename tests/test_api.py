"""End to end over loopback: the router and simulated vLLM backends as real servers."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RouterServer, running_router, running_simulators, wait_for

CHAT = {
    "model": "sim-model",
    "max_tokens": 5,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
}


def sse_events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """Split an SSE body into (event name, data) pairs."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name = None
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        events.append((name, data))
    return events


def stream_raw(
    router: RouterServer, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[tuple[str | None, bytes]]:
    with httpx.stream(
        "POST", f"{router.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=30
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.read())


def stats_events(events: list[tuple[str | None, bytes]]) -> list[tuple[str | None, bytes]]:
    """The router's stats messages (either form): they carry the name inside."""
    return [(n, d) for n, d in events if b'"kvroute_event":"router.stream_stats"' in d]


def test_stream_ends_with_stats_then_done(router: RouterServer) -> None:
    events = stream_raw(router, {**CHAT, "stream": True}, {"X-Tenant-ID": "acme"})
    assert events[-1] == (None, b"[DONE]")
    name, data = events[-2]
    # By default a plain data chunk, the name inside: every SSE reader can decode it.
    assert name is None
    assert stats_events(events) == [events[-2]]
    body = orjson.loads(data)
    assert body["kvroute_event"] == "router.stream_stats"
    assert "usage" not in body
    first = orjson.loads(events[0][1])
    assert body["id"] == first["id"]
    assert body["created"] == first["created"]
    assert body["model"] == "sim-model"
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"] == []
    stats = body["router_stats"]
    assert stats["backend"] in {"b0", "b1", "b2"}
    assert stats["cache_outcome"] == "miss"
    assert stats["tenant"] == "acme"
    assert stats["token_source"] == "backend"
    assert stats["completion_tokens"] == 5
    assert stats["prompt_tokens"] > 0
    assert stats["novel_tokens"] == stats["prompt_tokens"] - stats["cached_tokens"]
    assert stats["ttft_ms"] > 0
    assert len(stats["prefix_key"]) == 32
    # The injected usage chunk is hidden from a client that did not ask for it.
    assert not any(b'"usage"' in data for name, data in events[:-2])


def test_usage_kept_when_the_client_asked(router: RouterServer) -> None:
    events = stream_raw(router, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    usage = [orjson.loads(d) for n, d in events if n is None and b'"usage"' in d]
    assert len(usage) == 1
    assert usage[0]["choices"] == []
    assert stats_events(events) == [events[-2]]
    assert events[-3] == (None, orjson.dumps(usage[0]))


def test_stats_can_be_turned_off_per_request_and_globally(
    router: RouterServer, sims: list[Any]
) -> None:
    events = stream_raw(router, {**CHAT, "stream": True}, {"X-Router-Stream-Stats": "0"})
    assert events[-1] == (None, b"[DONE]")
    assert not stats_events(events)
    assert all(n is None for n, _ in events)
    assert b'"tok4 "' in events[-2][1]
    with running_router([s.url for s in sims], stream_stats=False) as quiet:
        for header in ("1", "event", "chunk"):
            events = stream_raw(quiet, {**CHAT, "stream": True}, {"X-Router-Stream-Stats": header})
            assert not stats_events(events)
            assert all(n is None for n, _ in events)
            assert events[-1] == (None, b"[DONE]")


def test_stats_form_per_request_and_by_setting(router: RouterServer, sims: list[Any]) -> None:
    named = stream_raw(router, {**CHAT, "stream": True}, {"X-Router-Stream-Stats": "event"})
    assert stats_events(named) == [named[-2]]
    assert named[-2][0] == "router.stream_stats"
    assert all(n is None for n, _ in named[:-2])
    with running_router([s.url for s in sims], stream_stats_format="event") as eventful:
        for headers in ({}, {"X-Router-Stream-Stats": "1"}):
            events = stream_raw(eventful, {**CHAT, "stream": True}, headers)
            assert stats_events(events) == [events[-2]]
            assert events[-2][0] == "router.stream_stats"
        events = stream_raw(eventful, {**CHAT, "stream": True}, {"X-Router-Stream-Stats": "chunk"})
        assert stats_events(events) == [events[-2]]
        assert events[-2][0] is None
        stats = orjson.loads(events[-2][1])["router_stats"]
        assert stats["completion_tokens"] == 5
        assert stats["token_source"] == "backend"


def test_second_turn_hits_the_owner_and_reports_cached_tokens(router: RouterServer) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    turn1: dict[str, Any] = {
        **CHAT,
        "stream": True,
        "messages": [system, {"role": "user", "content": "Question one " * 20}],
    }
    s1 = orjson.loads(stream_raw(router, turn1)[-2][1])["router_stats"]
    turn2 = {
        **turn1,
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and two"},
        ],
    }
    s2 = orjson.loads(stream_raw(router, turn2)[-2][1])["router_stats"]
    assert s2["backend"] == s1["backend"]
    assert s2["cache_outcome"] == "hit"
    assert s2["affinity"] == "conversation"
    assert s2["prefix_key"] == s1["prefix_key"]
    assert s2["cached_tokens"] > 0


def test_openai_client_streams_and_sees_stats(router: RouterServer) -> None:
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(stream=True, **CHAT))  # type: ignore[call-overload]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    extra = [
        c for c in chunks if not c.choices and c.model_extra and "router_stats" in c.model_extra
    ]
    assert len(extra) == 1
    assert extra[0].model_extra["router_stats"]["completion_tokens"] == 5
    assert extra[0].model_extra["kvroute_event"] == "router.stream_stats"
    completion = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].message.content


async def test_async_openai_client_streams(router: RouterServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    stream = await client.completions.create(
        model="sim-model", prompt="Once upon a time", max_tokens=4, stream=True
    )
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert len(texts) == 4
    await client.close()


def test_non_stream_carries_routing_headers(router: RouterServer) -> None:
    r = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 200
    assert r.headers["x-router-backend"] in {"b0", "b1", "b2"}
    assert r.headers["x-router-cache-outcome"] in {"miss", "hit"}
    assert r.headers["x-request-id"]
    assert r.json()["usage"]["completion_tokens"] == 5


def test_completions_stream_has_text_completion_stats(router: RouterServer) -> None:
    with httpx.stream(
        "POST",
        f"{router.url}/v1/completions",
        timeout=10,
        json={"model": "sim-model", "prompt": "hello", "max_tokens": 3, "stream": True},
    ) as r:
        events = sse_events(r.read())
    body = orjson.loads(events[-2][1])
    assert stats_events(events) == [events[-2]]
    assert body["object"] == "text_completion"


def test_models_lists_backend_models(router: RouterServer) -> None:
    body = httpx.get(f"{router.url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim-model"]
    assert body["data"][0]["object"] == "model"


@pytest.mark.parametrize(
    ("content", "headers", "status", "param"),
    [
        (b"{not json", {}, 400, None),
        (b"[1, 2]", {}, 400, None),
        (b"", {}, 400, None),
        (orjson.dumps({"model": "sim-model"}), {}, 400, "messages"),
        (orjson.dumps({"model": "sim-model", "messages": "hi"}), {}, 400, "messages"),
        (orjson.dumps({"model": "sim-model", "messages": [{"content": "x"}]}), {}, 400, "messages"),
        (orjson.dumps({**CHAT, "stream": "yes"}), {}, 400, "stream"),
        (orjson.dumps({**CHAT, "max_tokens": "5"}), {}, 400, "max_tokens"),
        (orjson.dumps({**CHAT, "model": "nope"}), {}, 404, "model"),
        (orjson.dumps({**CHAT, "model": 7}), {}, 400, "model"),
    ],
)
def test_bad_input_gets_openai_errors(
    router: RouterServer, content: bytes, headers: dict[str, str], status: int, param: str | None
) -> None:
    r = httpx.post(
        f"{router.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    if param:
        assert error["param"] == param


def test_completions_needs_a_prompt(router: RouterServer) -> None:
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "sim-model"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(
        f"{router.url}/v1/completions", json={"model": "sim-model", "prompt": [{"x": 1}]}
    )
    assert r.status_code == 400


def test_oversized_body_is_413(sims: list[Any]) -> None:
    with running_router([s.url for s in sims], max_body_bytes=2048) as small:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(f"{small.url}/v1/chat/completions", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_backend_errors_pass_through(router: RouterServer) -> None:
    r = httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 10**6})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "BadRequestError"  # vLLM's own body, untouched


def test_unknown_path_and_method_are_openai_shaped(router: RouterServer) -> None:
    r = httpx.get(f"{router.url}/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{router.url}/v1/chat/completions")
    assert r.status_code == 405
    assert "error" in r.json()


def test_health_metrics_architecture(router: RouterServer) -> None:
    # Twice: the second is a hit, whose answer's cached_tokens measures its backend's retention.
    stream_raw(router, {**CHAT, "stream": True})
    stream_raw(router, {**CHAT, "stream": True})
    health = httpx.get(f"{router.url}/health")
    assert health.status_code == 200
    assert [b["healthy"] for b in health.json()["backends"]] == [True, True, True]
    metrics = httpx.get(f"{router.url}/metrics").json()
    assert metrics["requests"]["streams"] >= 1
    assert metrics["ttft_ms"]["p50"] is not None
    assert metrics["tokens"]["completion"] >= 5
    assert set(metrics["in_flight"]) == {"b0", "b1", "b2"}
    prom = httpx.get(f"{router.url}/metrics", headers={"Accept": "text/plain;version=0.0.4"})
    assert prom.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(prom.text)}
    assert {"kvroute_requests", "kvroute_backend_in_flight", "kvroute_cache_outcomes"} <= names
    measured = [
        b["kv_retention"] for b in health.json()["backends"] if b["kv_retention"] is not None
    ]
    assert measured
    assert all(0.0 <= r <= 1.0 for r in measured)
    assert "kvroute_backend_kv_retention_ratio" in names
    # Each backend's KV cache size, from its cache_config_info (the simulator's default 4096
    # blocks of 16 tokens).
    backends = health.json()["backends"]
    assert [b["kv_cache_tokens"] for b in backends] == [4096 * 16] * 3
    sizes = {
        sample.labels["backend"]: sample.value
        for family in text_string_to_metric_families(prom.text)
        if family.name == "kvroute_backend_kv_cache_tokens"
        for sample in family.samples
    }
    assert sizes == {f"b{i}": 4096.0 * 16 for i in range(3)}
    arch = httpx.get(f"{router.url}/architecture").json()
    assert "retention" in arch["policy"]["cached"]
    assert [s["stage"] for s in arch["pipeline"]][:2] == ["client", "admission"]
    assert len(arch["backends"]) == 3


def test_secrets_stay_out_of_architecture(sims: list[Any]) -> None:
    with running_router([s.url for s in sims], backend_api_key="sk-very-secret", redis_url="") as r:
        text = httpx.get(f"{r.url}/architecture").text
        assert "sk-very-secret" not in text


def test_health_is_503_when_no_backend_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with running_router([dead], served_model="sim-model") as r:
        assert httpx.get(f"{r.url}/health").status_code == 503
        assert httpx.get(f"{r.url}/live").status_code == 200
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "no_healthy_backend"


def test_backend_api_key_is_sent_as_bearer() -> None:
    with (
        running_simulators(1, api_key="backend-key") as sims,
        running_router(
            [s.url for s in sims], backend_api_key="backend-key", served_model="sim-model"
        ) as r,
    ):
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200
    with (
        running_simulators(1, api_key="backend-key") as sims,
        running_router([s.url for s in sims], served_model="sim-model") as r,
    ):
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 401


def test_retry_on_another_backend_before_the_first_byte() -> None:
    with (
        running_simulators(2) as sims,
        running_router([s.url for s in sims], served_model="sim-model") as r,
    ):
        httpx.post(f"{sims[0].url}/sim/control", json={"fail_next": 100, "status": 503})
        for i in range(8):
            body = {**CHAT, "messages": [{"role": "user", "content": f"conversation {i}"}]}
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=10)
            assert resp.status_code == 200
            assert resp.headers["x-router-backend"] == "b1"
        refused = httpx.get(f"{sims[0].url}/sim/stats").json()
        served = httpx.get(f"{sims[1].url}/sim/stats").json()
        retries = httpx.get(f"{r.url}/metrics").json()["retries"]
        # Every 503 from b0 was retried on b1 before a byte reached the client.
        assert refused["failed"] >= 1
        assert retries == refused["failed"]
        assert refused["completed"] == 0
        assert served["completed"] == 8


def test_client_disconnect_aborts_upstream(sims: list[Any]) -> None:
    with running_router([sims[0].url], served_model="sim-model") as r:
        body = {**CHAT, "stream": True, "max_tokens": 100000 // 100}
        with httpx.stream("POST", f"{r.url}/v1/chat/completions", json=body, timeout=10) as resp:
            it = resp.iter_raw()
            next(it)
        wait_for(lambda: httpx.get(f"{sims[0].url}/sim/stats").json()["aborted"] >= 1)
        wait_for(lambda: r.router.pool.backends[0].in_flight == 0)
