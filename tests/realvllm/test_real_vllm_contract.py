"""Contract: the simulator answers like real vLLM (0.32, CPU build) wherever the router looks.

The same requests go to a real server and to a simulator serving the same model name. Bodies
are compared as *shapes*: every key path the simulator sends must exist in real vLLM with a type
real vLLM also uses there, and the keys the router and OpenAI clients rely on must be in both.
Texts, ids and numbers differ by nature (random weights, a fake tokenizer) and are not compared.
The last tests check, on real vLLM only, the behaviours the router is built on: prefix-cache
hits, queueing under a small --max-num-seqs, and aborting a request when its client leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator.config import SimConfig
from harness.simulator import SimulatorThread
from tools.realvllm import OUTLASTING_ANSWER, OUTLASTING_TOKENS, RealVllmServers

ROUTER_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "process_start_time_seconds",
)
MESSAGES = [{"role": "user", "content": "Say something."}]


# ---------------------------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True, slots=True)
class Pair:
    """Where to send the same request twice: a real vLLM and a simulator, same model name."""

    real: str
    sim: str
    model: str


@pytest.fixture(scope="module")
def pair(real_vllm_servers: RealVllmServers) -> Iterator[Pair]:
    sim = SimulatorThread(SimConfig(model=real_vllm_servers.model, max_model_len=2048))
    sim.start()
    try:
        yield Pair(real=real_vllm_servers.urls[0], sim=sim.url, model=real_vllm_servers.model)
    finally:
        sim.stop()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(method: str, url: str, body: Mapping[str, Any] | None = None) -> Reply:
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url, json=body) as response,
    ):
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        return Reply(response.status, content_type, await response.read())


async def both(
    pair: Pair, method: str, path: str, body: Mapping[str, Any] | None = None
) -> tuple[Reply, Reply]:
    """The same request to the real server and to the simulator, one after the other."""
    real = await call(method, pair.real + path, body)
    sim = await call(method, pair.sim + path, body)
    return real, sim


# ---------------------------------------------------------------------------------------------
# Shapes


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def key_paths(value: Any, prefix: str = "$") -> dict[str, set[str]]:
    """Every key path in a JSON value (list items share ``[]``) and the kinds seen there."""
    found: dict[str, set[str]] = {prefix: {kind(value)}}
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{prefix}.{key}", item) for key, item in value.items()]
    elif isinstance(value, list):
        children = [(f"{prefix}[]", item) for item in value]
    for path, item in children:
        for sub, kinds in key_paths(item, path).items():
            found.setdefault(sub, set()).update(kinds)
    return found


def merged_paths(values: list[Any]) -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    for value in values:
        for path, kinds in key_paths(value).items():
            merged.setdefault(path, set()).update(kinds)
    return merged


# Keys the simulator may send although vLLM 0.32 does not, each with the reason it is harmless.
TOLERATED_SIM_EXTRAS = {
    # vLLM up to ~0.11 sent `"tool_calls": []` on every message; 0.32 omits it when empty.
    # OpenAI clients read both; the router never looks inside messages of a response.
    "$.choices[].message.tool_calls",
}


def assert_sim_within_real(real: list[Any], sim: list[Any], what: str) -> None:
    """The simulator sends no key real vLLM never sends, and no kind of value it never uses."""
    real_paths, sim_paths = merged_paths(real), merged_paths(sim)
    extra = sorted(
        path
        for path in sim_paths
        if path not in real_paths
        and not any(path.startswith(tolerated) for tolerated in TOLERATED_SIM_EXTRAS)
    )
    assert not extra, f"{what}: simulator sends keys real vLLM does not: {extra}"
    wrong = {
        path: (sorted(kinds), sorted(real_paths[path]))
        for path, kinds in sim_paths.items()
        if path in real_paths and not kinds <= real_paths[path]
    }
    assert not wrong, f"{what}: value kinds differ, path: (simulator, real vLLM): {wrong}"


def assert_has_paths(values: list[Any], paths: list[str], what: str) -> None:
    present = merged_paths(values)
    missing = [path for path in paths if path not in present]
    assert not missing, f"{what}: missing {missing}"


def assert_same_shape(real: Any, sim: Any, required: list[str], what: str) -> None:
    assert_has_paths([real], required, f"{what} (real vLLM)")
    assert_has_paths([sim], required, f"{what} (simulator)")
    assert_sim_within_real([real], [sim], what)


# ---------------------------------------------------------------------------------------------
# SSE


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of a chat/completions stream; asserts vLLM's exact framing."""
    text = body.decode()
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: "), f"event is not a single data line: {event[:80]!r}"
        assert "\n" not in event, f"event spans several lines: {event[:80]!r}"
    payloads = [event.removeprefix("data: ") for event in events]
    assert payloads[-1] == "[DONE]", f"last event is not [DONE]: {payloads[-1][:80]!r}"
    assert "[DONE]" not in payloads[:-1], "[DONE] before the end of the stream"
    return payloads


def stream_chunks(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.body[:300]
    assert reply.content_type == "text/event-stream"
    chunks = [json.loads(payload) for payload in sse_events(reply.body)[:-1]]
    assert chunks, "no chunks before [DONE]"
    return chunks


def check_chat_stream(chunks: list[dict[str, Any]], *, include_usage: bool, who: str) -> None:
    """Role first, one id and object name throughout, a finish_reason, then usage if asked."""
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}, who
    assert len({c["id"] for c in chunks}) == 1, f"{who}: id changes within a stream"
    assert chunks[0]["id"].startswith("chatcmpl-"), who
    first = chunks[0]["choices"][0]["delta"]
    assert first.get("role") == "assistant", f"{who}: first chunk is not the role delta: {first}"
    assert first.get("content") == "", f"{who}: role delta content is {first.get('content')!r}"
    usage_chunks = [c for c in chunks if c.get("usage") is not None]
    empty_choices = [c for c in chunks if c["choices"] == []]
    if include_usage:
        assert chunks[-1]["choices"] == [], f"{who}: last chunk before [DONE] is not usage"
        assert usage_chunks == [chunks[-1]], who
        assert empty_choices == [chunks[-1]], who
        usage = chunks[-1]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], who
        assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int), who
        content = chunks[:-1]
    else:
        assert not usage_chunks, f"{who}: usage chunk not asked for"
        assert not empty_choices, f"{who}: usage chunk not asked for"
        content = chunks
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[-1] == "length", f"{who}: finish_reason {finishes[-1]!r}"
    assert all(f is None for f in finishes[:-1]), f"{who}: finish_reason before the end"


CHUNK_PATHS = [
    "$.id",
    "$.object",
    "$.created",
    "$.model",
    "$.choices[].index",
    "$.choices[].delta",
    "$.choices[].delta.role",
    "$.choices[].delta.content",
    "$.choices[].finish_reason",
]
USAGE_PATHS = [
    "$.usage.prompt_tokens",
    "$.usage.completion_tokens",
    "$.usage.total_tokens",
    "$.usage.prompt_tokens_details.cached_tokens",
]


# ---------------------------------------------------------------------------------------------
# Metrics


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


async def metric(url: str, name: str) -> float:
    """Sum of one metric's samples on a server (one engine, so one sample in practice)."""
    reply = await call("GET", url + "/metrics")
    assert reply.status == 200
    return sum(value for _, value in metric_samples(reply.body.decode()).get(name, []))


async def wait_metric(url: str, name: str, want: float, timeout_s: float) -> float:
    """Wait until a metric equals ``want``; returns the seconds it took."""
    started = time.monotonic()
    while (value := await metric(url, name)) != want:
        assert time.monotonic() - started < timeout_s, f"{name} stuck at {value} on {url}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# The checkers bite (no server needed)


def test_shape_check_catches_extra_keys_and_kinds() -> None:
    real = [{"usage": {"prompt_tokens": 3, "prompt_tokens_details": None}}]
    assert_sim_within_real(real, [{"usage": {"prompt_tokens": 3.0}}], "ok")
    with pytest.raises(AssertionError, match="keys real vLLM does not"):
        assert_sim_within_real(real, [{"usage": {"prompt_tokens": 3, "cached": 1}}], "extra")
    with pytest.raises(AssertionError, match="value kinds differ"):
        assert_sim_within_real(real, [{"usage": {"prompt_tokens": "3"}}], "kind")


@pytest.mark.parametrize(
    "body",
    [
        b'data: {"a": 1}\n\n',  # no [DONE]
        b'data: {"a": 1}\ndata: [DONE]\n\n',  # one event, two lines
        b'event: x\ndata: {"a": 1}\n\ndata: [DONE]\n\n',  # an event: line
        b'data: {"a": 1}\n\ndata: [DONE]\n',  # unterminated last event
    ],
)
def test_sse_check_catches_bad_framing(body: bytes) -> None:
    with pytest.raises(AssertionError):
        sse_events(body)
    assert sse_events(b'data: {"a": 1}\n\ndata: [DONE]\n\n') == ['{"a": 1}', "[DONE]"]


# ---------------------------------------------------------------------------------------------
# Contract: real vLLM and the simulator


async def test_health(pair: Pair) -> None:
    real, sim = await both(pair, "GET", "/health")
    assert (real.status, sim.status) == (200, 200)
    assert real.body == sim.body == b""


async def test_models(pair: Pair) -> None:
    real, sim = await both(pair, "GET", "/v1/models")
    assert (real.status, sim.status) == (200, 200)
    assert real.content_type == sim.content_type == "application/json"
    for reply in (real, sim):
        body = reply.json()
        assert body["object"] == "list"
        assert [card["id"] for card in body["data"]] == [pair.model]
        assert body["data"][0]["object"] == "model"
        assert body["data"][0]["owned_by"] == "vllm"
        assert body["data"][0]["max_model_len"] == 2048
    required = ["$.object", "$.data[].id", "$.data[].object", "$.data[].created",
                "$.data[].owned_by", "$.data[].max_model_len"]  # fmt: skip
    assert_same_shape(real.json(), sim.json(), required, "/v1/models")


async def test_chat_non_stream(pair: Pair) -> None:
    body = {"model": pair.model, "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True}
    real, sim = await both(pair, "POST", "/v1/chat/completions", body)
    assert (real.status, sim.status) == (200, 200)
    assert real.content_type == sim.content_type == "application/json"
    for reply in (real, sim):
        data = reply.json()
        assert data["object"] == "chat.completion"
        assert data["id"].startswith("chatcmpl-")
        assert data["model"] == pair.model
        assert data["choices"][0]["message"]["role"] == "assistant"
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 5
    required = ["$.id", "$.object", "$.created", "$.model", "$.choices[].index",
                "$.choices[].message.role", "$.choices[].message.content",
                "$.choices[].finish_reason", *USAGE_PATHS]  # fmt: skip
    assert_same_shape(real.json(), sim.json(), required, "chat completion")


async def test_chat_content_parts(pair: Pair) -> None:
    """Content as a list of text parts (the OpenAI format) is accepted by both."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    body = {"model": pair.model, "messages": parts, "max_tokens": 2}
    real, sim = await both(pair, "POST", "/v1/chat/completions", body)
    assert (real.status, sim.status) == (200, 200), (real.body[:300], sim.body[:300])


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(pair: Pair, include_usage: bool) -> None:
    body: dict[str, Any] = {
        "model": pair.model,
        "messages": MESSAGES,
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    real, sim = await both(pair, "POST", "/v1/chat/completions", body)
    real_chunks, sim_chunks = stream_chunks(real), stream_chunks(sim)
    check_chat_stream(real_chunks, include_usage=include_usage, who="real vLLM")
    check_chat_stream(sim_chunks, include_usage=include_usage, who="simulator")
    required = CHUNK_PATHS + (USAGE_PATHS if include_usage else [])
    assert_has_paths(real_chunks, required, "real chat stream")
    assert_has_paths(sim_chunks, required, "simulator chat stream")
    assert_sim_within_real(real_chunks, sim_chunks, "chat stream chunks")


async def test_completions(pair: Pair) -> None:
    body = {"model": pair.model, "prompt": "Say something.", "max_tokens": 3, "ignore_eos": True}
    real, sim = await both(pair, "POST", "/v1/completions", body)
    assert (real.status, sim.status) == (200, 200), sim.body[:300]
    for reply in (real, sim):
        data = reply.json()
        assert data["object"] == "text_completion"
        assert data["id"].startswith("cmpl-")
        assert data["usage"]["completion_tokens"] == 3
    required = ["$.id", "$.object", "$.model", "$.choices[].text", "$.choices[].finish_reason",
                *USAGE_PATHS]  # fmt: skip
    assert_same_shape(real.json(), sim.json(), required, "completion")

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    real, sim = await both(pair, "POST", "/v1/completions", stream)
    real_chunks, sim_chunks = stream_chunks(real), stream_chunks(sim)
    for who, chunks in (("real vLLM", real_chunks), ("simulator", sim_chunks)):
        assert {c["object"] for c in chunks} == {"text_completion"}, who
        assert chunks[-1]["choices"] == [], who
        assert chunks[-1]["usage"]["completion_tokens"] == 3, who
        assert all(c["choices"] for c in chunks[:-1]), who
    assert_sim_within_real(real_chunks, sim_chunks, "completion stream chunks")


ERROR_CASES: dict[str, tuple[dict[str, Any], int]] = {
    "unknown model": (
        {"model": "nope", "messages": MESSAGES},
        404,
    ),
    "unknown model, streaming": (
        {"model": "nope", "messages": MESSAGES, "stream": True},
        404,
    ),
    "max_tokens above max_model_len": (
        {"model": "{model}", "messages": MESSAGES, "max_tokens": 100_000},
        400,
    ),
    "missing messages": (
        {"model": "{model}", "max_tokens": 3},
        400,
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
async def test_error_shapes(pair: Pair, case: str) -> None:
    template, status = ERROR_CASES[case]
    body = {k: (pair.model if v == "{model}" else v) for k, v in template.items()}
    real, sim = await both(pair, "POST", "/v1/chat/completions", body)
    assert (real.status, sim.status) == (status, status), (real.body[:300], sim.body[:300])
    # An error is a plain JSON body, never SSE, even when a stream was asked for.
    assert real.content_type == sim.content_type == "application/json"
    real_error, sim_error = real.json()["error"], sim.json()["error"]
    for who, error in (("real vLLM", real_error), ("simulator", sim_error)):
        assert set(error) == {"message", "type", "param", "code"}, who
        assert error["code"] == status, who
        assert isinstance(error["message"], str), who
        assert error["message"], who
    assert set(real.json()) == set(sim.json()) == {"error"}
    assert sim_error["type"] == real_error["type"], case
    assert sim_error["param"] == real_error["param"], case


async def test_metrics_names(pair: Pair) -> None:
    real, sim = await both(pair, "GET", "/metrics")
    assert (real.status, sim.status) == (200, 200)
    assert real.content_type == sim.content_type == "text/plain"
    real_samples = metric_samples(real.body.decode())
    sim_samples = metric_samples(sim.body.decode())
    for name in ROUTER_METRICS:
        assert name in real_samples, f"real vLLM lacks {name}"
        assert name in sim_samples, f"simulator lacks {name}"
    for name in ROUTER_METRICS:
        if name.startswith("vllm:"):
            for who, samples in (("real vLLM", real_samples), ("simulator", sim_samples)):
                labels = [labels for labels, _ in samples[name]]
                assert any(lab.get("model_name") == pair.model for lab in labels), (who, name)


# ---------------------------------------------------------------------------------------------
# Responses API (the store on: VLLM_ENABLE_RESPONSES_API_STORE=1 in both)

RESPONSE_PATHS = [
    "$.id",
    "$.object",
    "$.status",
    "$.model",
    "$.instructions",
    "$.previous_response_id",
    "$.output[].type",
    "$.output[].role",
    "$.output[].content[].type",
    "$.output[].content[].text",
    "$.usage.input_tokens",
    "$.usage.output_tokens",
    "$.usage.total_tokens",
    "$.usage.input_tokens_details.cached_tokens",
]


def responses_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": "Say something.",
        "max_output_tokens": 4,
        "ignore_eos": True,
        **extra,
    }


async def test_responses_create_get_chain_cancel(pair: Pair) -> None:
    real, sim = await both(
        pair, "POST", "/v1/responses", responses_body(pair.model, instructions="Be brief.")
    )
    assert (real.status, sim.status) == (200, 200), real.body[:300]
    assert real.content_type == sim.content_type == "application/json"
    assert_same_shape(real.json(), sim.json(), RESPONSE_PATHS, "POST /v1/responses")
    for url, reply in ((pair.real, real), (pair.sim, sim)):
        created = reply.json()
        assert created["id"].startswith("resp_")
        assert created["object"] == "response"
        assert created["instructions"] == "Be brief."
        fetched = await call("GET", f"{url}/v1/responses/{created['id']}")
        assert fetched.status == 200
        assert fetched.json()["id"] == created["id"]
        chained = await call(
            "POST",
            url + "/v1/responses",
            responses_body(pair.model, input="More.", previous_response_id=created["id"]),
        )
        assert chained.status == 200, chained.body[:300]
        data = chained.json()
        assert data["previous_response_id"] == created["id"]
        assert data["instructions"] is None  # instructions do not carry over
        assert data["usage"]["input_tokens"] > created["usage"]["input_tokens"] - 8
        cancel = await call("POST", f"{url}/v1/responses/{created['id']}/cancel")
        assert cancel.status == 400
        assert cancel.json()["error"]["message"] == "Cannot cancel a synchronous response."
    real_get = await call("GET", f"{pair.real}/v1/responses/{real.json()['id']}")
    sim_get = await call("GET", f"{pair.sim}/v1/responses/{sim.json()['id']}")
    assert_same_shape(real_get.json(), sim_get.json(), RESPONSE_PATHS, "GET /v1/responses/{id}")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/responses", {"input": "x", "previous_response_id": "resp_nope"}),
        ("GET", "/v1/responses/resp_nope", None),
        ("POST", "/v1/responses/resp_nope/cancel", None),
        (
            "POST",
            "/v1/responses",
            {"input": "x", "previous_response_id": "resp_nope", "stream": True},
        ),
    ],
)
async def test_responses_unknown_id(
    pair: Pair, method: str, path: str, body: dict[str, Any] | None
) -> None:
    real, sim = await both(pair, method, path, body)
    assert (real.status, sim.status) == (404, 404)
    assert real.json() == sim.json()  # the same body, word for word
    assert real.json()["error"]["param"] == "response_id"


@pytest.mark.parametrize(
    "body",
    [
        {"max_output_tokens": 3},  # no input
        {"input": "x", "model": "nope"},
        {
            "input": "x",
            "previous_response_id": "resp_x",
            "previous_input_messages": [{"role": "user", "content": "y"}],
        },
    ],
)
async def test_responses_errors(pair: Pair, body: dict[str, Any]) -> None:
    real, sim = await both(pair, "POST", "/v1/responses", {"model": pair.model, **body})
    assert real.status == sim.status
    assert real.status in (400, 404)
    assert real.json()["error"]["param"] == sim.json()["error"]["param"]
    assert real.json()["error"]["type"] == sim.json()["error"]["type"]


def response_events(reply: Reply) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a Responses stream; asserts the framing (no [DONE])."""
    assert reply.status == 200, reply.body[:300]
    assert reply.content_type == "text/event-stream"
    text = reply.body.decode()
    assert text.endswith("\n\n")
    events = []
    for raw in text[:-2].split("\n\n"):
        name_line, data_line = raw.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


async def test_responses_stream_events(pair: Pair) -> None:
    real, sim = await both(pair, "POST", "/v1/responses", responses_body(pair.model, stream=True))
    kinds: dict[str, list[str]] = {}
    for who, reply in (("real", real), ("sim", sim)):
        events = response_events(reply)
        assert [d["sequence_number"] for _, d in events] == list(range(len(events))), who
        # Consecutive deltas as one: their number follows the tokenizer.
        names = [n for i, (n, _) in enumerate(events) if i == 0 or n != events[i - 1][0]]
        kinds[who] = names
        created, completed = events[0][1]["response"], events[-1][1]["response"]
        assert completed["id"] == created["id"], who
        assert completed["usage"]["output_tokens"] == 4, who
    assert kinds["real"] == kinds["sim"]
    assert kinds["real"][0] == "response.created"
    assert kinds["real"][-1] == "response.completed"
    by_kind: dict[str, tuple[list[Any], list[Any]]] = {}
    for index, reply in enumerate((real, sim)):
        for name, data in response_events(reply):
            by_kind.setdefault(name, ([], []))[index].append(data)
    for name, (real_data, sim_data) in by_kind.items():
        assert_sim_within_real(real_data, sim_data, f"stream event {name}")


async def test_responses_store_is_per_server(real_vllm_servers: RealVllmServers) -> None:
    """Why the router pins turns: a response exists only on the server that made it."""
    first, second = real_vllm_servers.urls
    created = await call("POST", first + "/v1/responses", responses_body(real_vllm_servers.model))
    rid = created.json()["id"]
    assert (await call("GET", f"{first}/v1/responses/{rid}")).status == 200
    assert (await call("GET", f"{second}/v1/responses/{rid}")).status == 404
    elsewhere = await call(
        "POST",
        second + "/v1/responses",
        responses_body(real_vllm_servers.model, previous_response_id=rid),
    )
    assert elsewhere.status == 404


# ---------------------------------------------------------------------------------------------
# Real vLLM only: the behaviours the router depends on


async def test_repeated_long_prompt_hits_prefix_cache(real_vllm_servers: RealVllmServers) -> None:
    url = real_vllm_servers.urls[0]
    # A fresh nonce up front, so the first request cannot hit blocks of an earlier run.
    system = f"nonce {uuid.uuid4().hex} " + " ".join(
        f"item{i} value {i * 7} next" for i in range(60)
    )
    body = {
        "model": real_vllm_servers.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "q"}],
        "max_tokens": 1,
    }
    hits_before = await metric(url, "vllm:prefix_cache_hits_total")
    first = await call("POST", url + "/v1/chat/completions", body)
    second = await call("POST", url + "/v1/chat/completions", body)
    streamed = await call(
        "POST",
        url + "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    usage_first, usage_second = first.json()["usage"], second.json()["usage"]
    usage_streamed = stream_chunks(streamed)[-1]["usage"]
    assert usage_first["prompt_tokens"] > 256, "prompt too short to fill whole cache blocks"
    assert usage_first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = usage_second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= usage_second["prompt_tokens"]
    assert usage_streamed["prompt_tokens_details"]["cached_tokens"] == cached
    # The counter is fed by engine stats, which may land just after the responses.
    deadline = time.monotonic() + 10
    while (hits := await metric(url, "vllm:prefix_cache_hits_total")) < hits_before + 2 * cached:
        assert time.monotonic() < deadline, f"prefix_cache_hits_total {hits}, want +{2 * cached}"
        await asyncio.sleep(0.05)


async def test_small_max_num_seqs_queues(real_vllm_servers: RealVllmServers) -> None:
    url = real_vllm_servers.queued_url
    cap = real_vllm_servers.queued_max_num_seqs
    body = {
        "model": real_vllm_servers.model,
        "messages": MESSAGES,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }

    async def stream(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            async for _ in response.content.iter_any():
                pass

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(stream(session)) for _ in range(40)]
        try:
            waiting_max = running_max = 0.0
            deadline = time.monotonic() + 60
            while waiting_max == 0 and time.monotonic() < deadline:
                reply = await call("GET", url + "/metrics")
                samples = metric_samples(reply.body.decode())
                waiting_max = max(waiting_max, samples["vllm:num_requests_waiting"][0][1])
                running_max = max(running_max, samples["vllm:num_requests_running"][0][1])
                await asyncio.sleep(0.05)
            assert waiting_max > 0, "server with --max-num-seqs 4 never queued 40 streams"
            assert running_max <= cap
        finally:
            for task in tasks:
                task.cancel()  # the clients leave: vLLM aborts all 40
            await asyncio.gather(*tasks, return_exceptions=True)
    await wait_metric(url, "vllm:num_requests_running", 0.0, timeout_s=30)
    await wait_metric(url, "vllm:num_requests_waiting", 0.0, timeout_s=30)


async def test_client_disconnect_aborts_request(real_vllm_servers: RealVllmServers) -> None:
    url = real_vllm_servers.urls[0]
    # A long answer (OUTLASTING_ANSWER), so that a disconnect noticed late on a loaded machine
    # still lands before the end: with one sample, a CI box generated all 1900 tokens before
    # vLLM's API server got to the disconnect, and the test could not tell an abort from none.
    body = {
        "model": real_vllm_servers.model,
        "messages": MESSAGES,
        **OUTLASTING_ANSWER,
        "stream": True,
    }
    await wait_metric(url, "vllm:num_requests_running", 0.0, timeout_s=30)
    generated_before = await metric(url, "vllm:generation_tokens_total")
    async with aiohttp.ClientSession() as session:
        response = await session.post(url + "/v1/chat/completions", json=body)
        events = 0
        while events < 5:
            line = await response.content.readline()
            assert line, "stream ended early"
            events += line.startswith(b"data: ")
        # Drop the connection mid-stream at once: a /metrics call first would let it run on.
        response.close()
    took_s = await wait_metric(url, "vllm:num_requests_running", 0.0, timeout_s=20)
    generated = await metric(url, "vllm:generation_tokens_total") - generated_before
    # Room for the API server's stalls, still well short of the 15-30 s the answer runs. How
    # many tokens come before vLLM notices the disconnect depends on the load (3 on an idle box).
    assert took_s < 10.0, f"request still running {took_s:.1f} s after the client left"
    assert generated < OUTLASTING_TOKENS / 2, (
        f"generation went on after the disconnect: {generated}"
    )
