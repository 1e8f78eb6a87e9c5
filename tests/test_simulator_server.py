"""The simulated vLLM server over real HTTP on loopback: shapes, cache hits, errors, metrics,
scheduling, disconnects, controls and auth."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimConfig, SimulatorProcess
from app.simulator.config import config_to_argv, parse_argv
from harness.simulator import SimulatorThread

FAST = SimConfig(
    model=("sim-model", "sim-alias"),
    base_ttft_s=0.001,
    prefill_s_per_token=0.00001,
    decode_tokens_per_s=2000.0,
    max_model_len=4096,
    capacity_blocks=1024,
)
# Two slots, slow decode: 20 tokens take 0.4 s, long enough to watch requests queue.
SLOW = SimConfig(max_num_seqs=2, base_ttft_s=0.001, decode_tokens_per_s=50.0)
KEY = "sekret"
SYSTEM = "You are a terse assistant. " * 12  # about 80 tokens


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return {"model": "sim-model", "messages": messages, "max_tokens": 5, **extra}


def control(url: str, **settings: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/sim/control", data=json.dumps(settings).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = json.load(response)
    return result


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/sim/stats") as response:
        result: dict[str, Any] = await response.json()
    return result


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll `check` until true; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read_events(response: aiohttp.ClientResponse, limit: int | None = None) -> list[bytes]:
    """Raw SSE events (without the trailing blank line), optionally only the first `limit`."""
    events: list[bytes] = []
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append(event)
            if limit is not None and len(events) >= limit:
                return events
    assert buffer == b""
    return events


def payloads(events: list[bytes]) -> list[Any]:
    assert all(event.startswith(b"data: ") for event in events)
    return [
        event[6:].decode() if event == b"data: [DONE]" else json.loads(event[6:])
        for event in events
    ]


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_server() -> Iterator[SimulatorThread]:
    with SimulatorThread(FAST) as server:
        yield server


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SimulatorThread]:
    with SimulatorThread(SLOW) as server:
        yield server


@pytest.fixture
def sim(fast_server: SimulatorThread) -> str:
    control(fast_server.url, reset=True)
    return fast_server.url


@pytest.fixture
def slow(slow_server: SimulatorThread) -> str:
    control(slow_server.url, reset=True)
    return slow_server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- shapes ------------------------------------------------------------------------------
async def test_chat_non_stream_shape(sim: str, http: aiohttp.ClientSession) -> None:
    async with http.post(sim + "/v1/chat/completions", json=chat()) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "sim-model"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_stream_shape_with_usage(sim: str, http: aiohttp.ClientSession) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    async with http.post(sim + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_events(response)
    data = payloads(events)
    for event, payload in zip(events, data[:-1], strict=False):
        assert event[6:] == json.dumps(payload, separators=(",", ":")).encode()  # compact JSON
    role, *content, usage_chunk, done = data
    assert done == "[DONE]"
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in content] == [f"tok{i} " for i in range(5)]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    assert len({chunk["id"] for chunk in data[:-1]}) == 1
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_stream_has_usage_chunk_only_when_asked(
    sim: str, http: aiohttp.ClientSession
) -> None:
    for options in (None, {"include_usage": False}):
        body = chat(stream=True) if options is None else chat(stream=True, stream_options=options)
        async with http.post(sim + "/v1/chat/completions", json=body) as response:
            data = payloads(await read_events(response))
        assert data[-1] == "[DONE]"
        assert all("usage" not in chunk for chunk in data[:-1])
        assert len(data) == 1 + 5 + 1


async def test_completions_shapes(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-alias", "prompt": "Once upon a time " * 10, "max_tokens": 3}
    async with http.post(sim + "/v1/completions", json=body) as response:
        result = await response.json()
    assert result["id"].startswith("cmpl-")
    assert result["object"] == "text_completion"
    assert result["model"] == "sim-alias"
    assert result["choices"][0]["text"] == "tok0 tok1 tok2 "
    assert result["usage"]["prompt_tokens"] == 43  # 170 bytes / 4, rounded up

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(sim + "/v1/completions", json=stream) as response:
        *chunks, usage_chunk, done = payloads(await read_events(response))
    assert done == "[DONE]"
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 43

    ids = {"prompt": [1, 2, 3, 4, 5], "max_tokens": 2}  # token ids, model defaults to the first
    async with http.post(sim + "/v1/completions", json=ids) as response:
        result = await response.json()
    assert result["usage"]["prompt_tokens"] == 5
    assert result["model"] == "sim-model"


# --- prefix cache ------------------------------------------------------------------------
async def test_second_identical_request_hits_the_cache(
    sim: str, http: aiohttp.ClientSession
) -> None:
    cached = []
    for _ in range(2):
        async with http.post(sim + "/v1/chat/completions", json=chat()) as response:
            usage = (await response.json())["usage"]
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    prompt_tokens = usage["prompt_tokens"]
    assert cached[0] == 0
    assert cached[1] == (prompt_tokens - 1) // 16 * 16 > 0
    result = await stats(http, sim)
    assert result["cached_tokens_total"] == cached[1]
    assert [entry["cached_tokens"] for entry in result["log"]] == cached


async def test_next_turn_hits_previous_prompt_and_reply(
    sim: str, http: aiohttp.ClientSession
) -> None:
    first = chat("tell me a story", max_tokens=40)
    async with http.post(sim + "/v1/chat/completions", json=first) as response:
        body = await response.json()
    reply = body["choices"][0]["message"]["content"]
    first_prompt = body["usage"]["prompt_tokens"]
    second = chat(max_tokens=5)
    second["messages"] = [
        *first["messages"],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and then?"},
    ]
    async with http.post(sim + "/v1/chat/completions", json=second) as response:
        usage = (await response.json())["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > first_prompt


async def test_cache_salt_isolates(sim: str, http: aiohttp.ClientSession) -> None:
    async def cached(salt: str | None) -> int:
        body = chat() if salt is None else chat(cache_salt=salt)
        async with http.post(sim + "/v1/chat/completions", json=body) as response:
            result: int = (await response.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
        return result

    assert await cached("a") == 0
    assert await cached("b") == 0
    assert await cached(None) == 0
    assert await cached("a") > 0


async def test_prompt_tokens_details_can_be_off(http: aiohttp.ClientSession) -> None:
    config = SimConfig(prompt_tokens_details=False, no_delay=True)
    with SimulatorThread(config) as server:
        async with http.post(server.url + "/v1/chat/completions", json=chat()) as response:
            usage = (await response.json())["usage"]
    assert "prompt_tokens_details" not in usage


# --- ids, headers, errors ----------------------------------------------------------------
async def test_request_id_and_forwarded_headers(sim: str, http: aiohttp.ClientSession) -> None:
    headers = {
        "X-Request-Id": "trace-1-attempt-0",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Authorization": "Bearer tenant-token",
    }
    async with http.post(sim + "/v1/chat/completions", json=chat(), headers=headers) as response:
        assert (await response.json())["id"] == "chatcmpl-trace-1-attempt-0"
    body = chat(stream=True, request_id="from-body")
    async with http.post(sim + "/v1/chat/completions", json=body) as response:
        assert payloads(await read_events(response))[0]["id"] == "chatcmpl-from-body"
    first = (await stats(http, sim))["log"][0]
    assert first["headers"]["x-request-id"] == "trace-1-attempt-0"
    assert first["headers"]["traceparent"] == headers["traceparent"]
    assert first["headers"]["authorization"] == "Bearer tenant-token"
    assert first["outcome"] == "completed"


BAD_REQUESTS: list[tuple[str, Any, int, str, str | None, str]] = [
    # path, body (bytes = raw), status, type, param, message start
    (
        "/v1/chat/completions",
        chat(model="nope"),
        404,
        "NotFoundError",
        "model",
        "The model `nope` does not exist.",
    ),
    (
        "/v1/chat/completions",
        {"model": "sim-model"},
        400,
        "Bad Request",
        "body.messages",
        "1 validation error:",
    ),
    (
        "/v1/completions",
        {"model": "sim-model"},
        400,
        "Bad Request",
        "body.prompt",
        "1 validation error:",
    ),
    (
        "/v1/chat/completions",
        b'{"model": "sim-model",',
        400,
        "Bad Request",
        None,
        "1 validation error:",
    ),
    (
        "/v1/chat/completions",
        chat(max_tokens="many"),
        400,
        "Bad Request",
        "body.max_tokens",
        "1 validation error:",
    ),
    (
        "/v1/chat/completions",
        chat(stream="yes"),
        400,
        "Bad Request",
        "body.stream",
        "1 validation error:",
    ),
    (
        "/v1/chat/completions",
        chat(max_tokens=5000),
        400,
        "BadRequestError",
        "max_tokens",
        "max_tokens=5000 cannot be greater than max_model_len=4096.",
    ),
    (
        "/v1/chat/completions",
        chat("x" * 20_000),
        400,
        "BadRequestError",
        "input_tokens",
        "This model's maximum context length is 4096 tokens. However, your prompt contains at least 4097 input tokens",
    ),
    (
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        "BadRequestError",
        "stream_options",
        "Stream options can only be defined when `stream=True`.",
    ),
    (
        "/v1/chat/completions",
        chat(temperature=-1),
        400,
        "BadRequestError",
        "temperature",
        "temperature must be non-negative",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "kind", "param", "message"), BAD_REQUESTS)
async def test_error_bodies(
    sim: str,
    http: aiohttp.ClientSession,
    path: str,
    body: Any,
    status: int,
    kind: str,
    param: str | None,
    message: str,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    async with http.post(sim + path, data=data, headers=headers) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == kind
    assert error["message"].startswith(message)
    if param is not None:
        assert error["param"] == param
    assert (await stats(http, sim))["rejected"] == 1


async def test_unknown_path_and_method(sim: str, http: aiohttp.ClientSession) -> None:
    async with http.get(sim + "/v1/nothing") as response:
        assert response.status == 404
        assert await response.json() == {"detail": "Not Found"}
    async with http.get(sim + "/v1/chat/completions") as response:
        assert response.status == 405


async def test_models_health_version(sim: str, http: aiohttp.ClientSession) -> None:
    async with http.get(sim + "/v1/models") as response:
        models = await response.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sim-model", "sim-alias"]
    card = models["data"][0]
    assert card["owned_by"] == "vllm"
    assert card["parent"] is None
    assert card["max_model_len"] == 4096
    async with http.get(sim + "/health") as response:
        assert response.status == 200
        assert await response.read() == b""
    async with http.get(sim + "/version") as response:
        assert (await response.json())["simulator"] is True


# --- metrics -----------------------------------------------------------------------------
async def test_metrics_parse_with_vllm_names(sim: str, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        async with http.post(sim + "/v1/chat/completions", json=chat()) as response:
            usage = (await response.json())["usage"]
    async with http.get(sim + "/metrics") as response:
        text = await response.text()
    samples = {
        (sample.name, sample.labels.get("finished_reason")): sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, reason: str | None = None) -> float:
        sample = samples[(name, reason)]
        if name.startswith("vllm:"):
            assert sample.labels["engine"] == "0"
            assert sample.labels["model_name"] == "sim-model"
        return float(sample.value)

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0
    assert value("vllm:prefix_cache_queries_total") == 2 * usage["prompt_tokens"]
    assert value("vllm:prefix_cache_hits_total") == usage["prompt_tokens_details"]["cached_tokens"]
    assert value("vllm:prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert value("vllm:generation_tokens_total") == 10
    assert value("vllm:request_success_total", "length") == 2
    assert value("vllm:request_success_total", "abort") == 0
    info = samples[("vllm:cache_config_info", None)]
    assert info.value == 1.0
    assert info.labels["block_size"] == "16"
    assert info.labels["num_gpu_blocks"] == "1024"
    assert info.labels["enable_prefix_caching"] == "True"
    assert value("process_start_time_seconds") > 1_600_000_000


# --- scheduling and disconnects ------------------------------------------------------------
async def gauges(http: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    result = await stats(http, url)
    return result["running"], result["waiting"]


async def test_running_and_waiting_with_two_slots(slow: str, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "hello", "max_tokens": 20}

    async def one() -> int:
        async with http.post(slow + "/v1/completions", json=body) as response:
            usage: dict[str, int] = (await response.json())["usage"]
        return usage["completion_tokens"]

    tasks = [asyncio.create_task(one()) for _ in range(5)]

    async def queued() -> bool:
        return await gauges(http, slow) == (2, 3)

    await eventually(queued, what="2 running and 3 waiting")
    async with http.get(slow + "/metrics") as response:
        text = await response.text()
    assert 'vllm:num_requests_running{engine="0",model_name="sim-model"} 2.0' in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="sim-model"} 3.0' in text
    assert await asyncio.gather(*tasks) == [20] * 5
    assert await gauges(http, slow) == (0, 0)
    result = await stats(http, slow)
    assert result["completed"] == 5
    assert result["kv_cache_usage"] == 0
    assert max(entry["queue_s"] for entry in result["log"]) > 0.3  # the last wave waited


async def test_disconnect_mid_stream_aborts_and_frees_the_slot(
    slow: str, http: aiohttp.ClientSession
) -> None:
    long = {"prompt": "hello", "max_tokens": 1000, "stream": True}
    first = await http.post(slow + "/v1/completions", json=long)
    second = await http.post(slow + "/v1/completions", json=long)
    await read_events(first, limit=2)
    third = asyncio.create_task(
        http.post(slow + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    )

    async def full() -> bool:
        return await gauges(http, slow) == (2, 1)

    await eventually(full, what="two streams running and one waiting")
    first.close()  # client goes away mid-stream
    response = await third  # admitted into the freed slot, so it completes
    assert (await response.json())["usage"]["completion_tokens"] == 2
    second.close()

    async def settled() -> bool:
        result = await stats(http, slow)
        return bool(result["aborted"] == 2 and result["running"] == 0)

    await eventually(settled, what="both streams aborted")
    result = await stats(http, slow)
    assert result["completed"] == 1
    assert result["generation_tokens_total"] < 100
    assert result["kv_cache_usage"] == 0
    assert [entry["outcome"] for entry in result["log"]] == ["aborted", "aborted", "completed"]


async def test_disconnect_while_waiting_aborts(slow: str, http: aiohttp.ClientSession) -> None:
    long = {"prompt": "hello", "max_tokens": 1000, "stream": True}
    holders = [await http.post(slow + "/v1/completions", json=long) for _ in range(2)]
    waiting = await http.post(slow + "/v1/completions", json=long)  # headers come at once

    async def one_waiting() -> bool:
        return await gauges(http, slow) == (2, 1)

    await eventually(one_waiting, what="a waiting request")
    waiting.close()

    async def none_waiting() -> bool:
        return await gauges(http, slow) == (2, 0)

    await eventually(none_waiting, what="the waiting request to leave")
    for holder in holders:
        holder.close()

    async def idle() -> bool:
        return await gauges(http, slow) == (0, 0)

    await eventually(idle, what="idle")
    assert (await stats(http, slow))["aborted"] == 3


# --- controls ------------------------------------------------------------------------------
async def test_health_control(sim: str, http: aiohttp.ClientSession) -> None:
    control(sim, healthy=False)
    async with http.get(sim + "/health") as response:
        assert response.status == 503
    control(sim, healthy=True)
    async with http.get(sim + "/health") as response:
        assert response.status == 200


async def test_fail_next(sim: str, http: aiohttp.ClientSession) -> None:
    assert control(sim, fail_next=2, status=503)["controls"]["fail_next"] == 2
    statuses = []
    for stream in (True, False, False):
        async with http.post(sim + "/v1/chat/completions", json=chat(stream=stream)) as response:
            statuses.append(response.status)
            body = await response.read()
        if response.status == 503:
            assert response.content_type == "application/json"
            error = json.loads(body)["error"]
            assert error["code"] == 503
            assert error["type"] == "ServiceUnavailableError"
    assert statuses == [503, 503, 200]
    assert (await stats(http, sim))["failed"] == 2
    control(sim, fail_next=1, status=429)
    async with http.post(sim + "/v1/completions", json={"prompt": "hi"}) as response:
        assert response.status == 429
        assert (await response.json())["error"]["type"] == "RateLimitError"
    control(sim, fail_next=1)  # status back to 503 when not given
    async with http.post(sim + "/v1/completions", json={"prompt": "hi"}) as response:
        assert response.status == 503


async def test_fail_mid_stream_cuts_the_connection(sim: str, http: aiohttp.ClientSession) -> None:
    control(sim, fail_mid_stream_after=2)
    body = chat(stream=True, max_tokens=10)
    async with http.post(sim + "/v1/chat/completions", json=body) as response:
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    events = [e for e in received.split(b"\n\n") if e]
    assert len(events) == 3  # role + 2 content chunks, then nothing
    assert b"[DONE]" not in received

    async def counted() -> bool:
        result = await stats(http, sim)
        return bool(result["dropped"] == 1 and result["running"] == 0)

    await eventually(counted, what="the dropped stream to be counted")
    async with http.post(sim + "/v1/chat/completions", json=body) as response:  # one-shot
        assert payloads(await read_events(response))[-1] == "[DONE]"


async def test_error_mid_stream_sends_error_event(sim: str, http: aiohttp.ClientSession) -> None:
    control(sim, error_mid_stream_after=1)
    async with http.post(
        sim + "/v1/completions", json={"prompt": "hi", "stream": True}
    ) as response:
        assert response.status == 200
        data = payloads(await read_events(response))
    assert len(data) == 3
    assert data[0]["choices"][0]["text"] == "tok0 "
    assert data[1]["error"]["code"] == 500
    assert "choices" not in data[1]
    assert data[2] == "[DONE]"


async def test_delay_before_first_byte(sim: str, http: aiohttp.ClientSession) -> None:
    control(sim, delay_s=0.3)
    start = time.monotonic()
    async with http.post(sim + "/v1/chat/completions", json=chat(stream=True)) as response:
        headers_after = time.monotonic() - start
        await response.read()
    assert headers_after >= 0.3
    control(sim, delay_s=0)
    start = time.monotonic()
    async with http.post(sim + "/v1/chat/completions", json=chat(stream=True)) as response:
        assert time.monotonic() - start < 0.3
        await response.read()


async def test_restart_clears_cache_and_bumps_start_time(
    sim: str, http: aiohttp.ClientSession
) -> None:
    async def start_time() -> float:
        async with http.get(sim + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            if family.name == "process_start_time_seconds":
                return float(family.samples[0].value)
        raise AssertionError("no process_start_time_seconds")

    async def cached() -> int:
        async with http.post(sim + "/v1/chat/completions", json=chat()) as response:
            result: int = (await response.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
        return result

    await cached()
    assert await cached() > 0
    before = await start_time()
    control(sim, restart=True)
    assert await start_time() > before
    assert (await stats(http, sim))["requests"] == {"chat": 0, "completions": 0, "responses": 0}
    assert await cached() == 0


async def test_reset_restores_defaults(sim: str, http: aiohttp.ClientSession) -> None:
    control(sim, healthy=False, fail_next=3, delay_s=1.5)
    state = control(sim, reset=True)
    assert state["controls"]["healthy"] is True
    assert state["controls"]["fail_next"] == 0
    assert state["controls"]["delay_s"] == 0
    async with http.post(sim + "/sim/control", json={"bogus": 1}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "bogus"


# --- auth and the openai client ------------------------------------------------------------
async def test_api_key_guards_v1_only(http: aiohttp.ClientSession) -> None:
    with SimulatorThread(SimConfig(api_key=KEY, no_delay=True)) as server:
        url = server.url
        async with http.get(url + "/v1/models") as response:
            assert response.status == 401
            assert await response.json() == {"error": "Unauthorized"}
        wrong = {"Authorization": "Bearer nope"}
        async with http.post(url + "/v1/chat/completions", json=chat(), headers=wrong) as response:
            assert response.status == 401
        for open_path in ("/health", "/metrics", "/version", "/sim/stats"):
            async with http.get(url + open_path) as response:
                assert response.status == 200, open_path
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        try:
            reply = await client.chat.completions.create(**chat())
        finally:
            await client.close()
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        log = (await stats(http, url))["log"]
        assert [entry["outcome"] for entry in log] == ["unauthorized", "completed"]


async def test_openai_client_reads_everything(sim: str) -> None:
    client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="unused", max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim-model", "sim-alias"]
        for expected_cached in (False, True):
            stream = await client.chat.completions.create(
                **chat(), stream=True, stream_options={"include_usage": True}
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            assert text == "tok0 tok1 tok2 tok3 tok4 "
            assert usage is not None
            assert usage.prompt_tokens_details is not None
            assert ((usage.prompt_tokens_details.cached_tokens or 0) > 0) is expected_cached
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="hi")
    finally:
        await client.close()


# --- runners -------------------------------------------------------------------------------
async def test_stop_cuts_open_streams(http: aiohttp.ClientSession) -> None:
    server = SimulatorThread(SimConfig(decode_tokens_per_s=20.0))
    server.start()
    response = await http.post(
        server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1000, "stream": True}
    )
    await read_events(response, limit=1)
    start = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(None, server.stop)
    assert time.monotonic() - start < 2.0
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(server.url + "/health")


def test_config_round_trips_through_flags() -> None:
    config = SimConfig(
        model=("a", "b"),
        block_size=32,
        capacity_blocks=10,
        max_num_seqs=3,
        prefill_s_per_token=0.5,
        base_ttft_s=0.25,
        decode_tokens_per_s=7.0,
        no_delay=True,
        max_model_len=99,
        default_max_tokens=4,
        prompt_tokens_details=False,
        api_key="k",
        seed=5,
        log_size=3,
    )
    assert parse_argv(config_to_argv(config))[1] == config
    assert parse_argv([])[1] == SimConfig()
    with pytest.raises(ValueError, match="max_num_seqs"):
        SimConfig(max_num_seqs=0)


async def test_simulator_process(http: aiohttp.ClientSession) -> None:
    with SimulatorProcess(SimConfig(model="proc-model", no_delay=True)) as process:
        assert process.url.startswith("http://127.0.0.1:")
        async with http.get(process.url + "/v1/models") as response:
            assert (await response.json())["data"][0]["id"] == "proc-model"
        async with http.post(process.url + "/v1/completions", json={"prompt": "hi"}) as response:
            assert (await response.json())["usage"]["completion_tokens"] == 16
        assert process.stop() == 0
