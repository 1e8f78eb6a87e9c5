"""The simulator's Responses API over loopback HTTP: vLLM 0.32's shapes, its per-server store
(404 for an id it does not hold), chaining by `previous_response_id`, stream events, and the
official `openai` client (sync and async, stream and not)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from app.simulator import SimConfig
from harness.simulator import SimulatorThread

FAST = SimConfig(
    model="sim-model", base_ttft_s=0.001, prefill_s_per_token=0.00001, decode_tokens_per_s=5000
)


def post(url: str, path: str, body: Any) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    return _open(request)


def get(url: str, path: str) -> tuple[int, bytes]:
    return _open(urllib.request.Request(url + path))


def _open(request: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorThread]:
    with SimulatorThread(FAST) as running:
        yield running


@pytest.fixture
def sim(server: SimulatorThread) -> str:
    post(server.url, "/sim/control", {"reset": True})
    return server.url


def test_non_stream_shape_and_get(sim: str) -> None:
    status, raw = post(
        sim,
        "/v1/responses",
        {"model": "sim-model", "input": "hello", "instructions": "brief", "max_output_tokens": 4},
    )
    assert status == 200
    body = json.loads(raw)
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["instructions"] == "brief"
    [item] = body["output"]
    assert item["type"] == "message"
    assert item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text"
    assert item["content"][0]["text"] == "tok0 tok1 tok2 tok3 "
    usage = body["usage"]
    assert usage["output_tokens"] == 4
    assert usage["total_tokens"] == usage["input_tokens"] + 4
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert get(sim, f"/v1/responses/{body['id']}") == (200, raw)


def test_previous_response_id_continues_and_reuses_the_cache(sim: str) -> None:
    first = json.loads(post(sim, "/v1/responses", {"input": "x " * 80, "max_output_tokens": 8})[1])
    status, raw = post(
        sim,
        "/v1/responses",
        {"input": "more", "previous_response_id": first["id"], "max_output_tokens": 3},
    )
    assert status == 200
    second = json.loads(raw)
    assert second["previous_response_id"] == first["id"]
    # The new prompt is the old one, its answer, and the new input: longer, and mostly cached.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= 32


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/responses", {"input": "x", "previous_response_id": "resp_nope"}),
        ("GET", "/v1/responses/resp_nope", None),
        ("POST", "/v1/responses/resp_nope/cancel", b""),
    ],
)
def test_unknown_id_is_vllms_404(sim: str, method: str, path: str, body: Any) -> None:
    status, raw = post(sim, path, body) if method == "POST" else get(sim, path)
    assert status == 404
    assert json.loads(raw) == {
        "error": {
            "message": "Response with id 'resp_nope' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": 404,
        }
    }


def test_errors(sim: str) -> None:
    first = json.loads(post(sim, "/v1/responses", {"input": "x", "max_output_tokens": 2})[1])
    status, raw = post(sim, f"/v1/responses/{first['id']}/cancel", b"")
    assert status == 400
    assert json.loads(raw)["error"]["message"] == "Cannot cancel a synchronous response."
    both = {"input": "x", "previous_response_id": first["id"], "previous_input_messages": [{}]}
    status, raw = post(sim, "/v1/responses", both)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "previous_response_id"
    status, raw = post(sim, "/v1/responses", {"model": "sim-model"})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "body.input"
    status, raw = post(sim, "/v1/responses", {"model": "nope", "input": "x"})
    assert status == 404
    assert json.loads(raw)["error"]["param"] == "model"
    status, raw = post(sim, "/v1/responses", b"{nope")
    assert status == 400


def test_store_false_and_restart_forget(sim: str) -> None:
    unstored = json.loads(post(sim, "/v1/responses", {"input": "x", "store": False})[1])
    assert get(sim, f"/v1/responses/{unstored['id']}")[0] == 404
    stored = json.loads(post(sim, "/v1/responses", {"input": "x"})[1])
    assert get(sim, f"/v1/responses/{stored['id']}")[0] == 200
    post(sim, "/sim/control", {"restart": True})
    assert get(sim, f"/v1/responses/{stored['id']}")[0] == 404


def test_store_off_is_vllm_without_the_env_var() -> None:
    with SimulatorThread(SimConfig(responses_store=False)) as server:
        first = json.loads(post(server.url, "/v1/responses", {"input": "x"})[1])
        chained = {"input": "y", "previous_response_id": first["id"]}
        assert post(server.url, "/v1/responses", chained)[0] == 404


def test_stream_events(sim: str) -> None:
    status, raw = post(
        sim, "/v1/responses", {"input": "hi", "max_output_tokens": 3, "stream": True}
    )
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e]
    kinds = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    datas = [json.loads(e.split(b"\ndata: ", 1)[1]) for e in events]
    assert [d["sequence_number"] for d in datas] == list(range(len(events)))
    assert [d["type"] for d in datas] == kinds
    created, completed = datas[0]["response"], datas[-1]["response"]
    assert created["status"] == "in_progress"
    assert created["output"] == []
    assert completed["id"] == created["id"]
    assert completed["usage"]["output_tokens"] == 3
    assert get(sim, f"/v1/responses/{completed['id']}")[0] == 200


def test_openai_client_sync_chain(sim: str) -> None:
    client = openai.OpenAI(base_url=sim + "/v1", api_key="x", max_retries=0)
    first = client.responses.create(model="sim-model", input="hello", max_output_tokens=3)
    assert first.output_text == "tok0 tok1 tok2 "
    with client.responses.stream(
        model="sim-model", input="again", previous_response_id=first.id, max_output_tokens=2
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["tok0 ", "tok1 "]
    assert final.previous_response_id == first.id
    assert client.responses.retrieve(final.id).id == final.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")


async def test_openai_client_async_stream(sim: str) -> None:
    client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="x", max_retries=0)
    stream = await client.responses.create(
        model="sim-model", input="hello", max_output_tokens=2, stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    await client.close()


def test_input_items_with_tool_calls(sim: str) -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "name": "weather", "arguments": "{}", "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "thanks"},
    ]
    status, raw = post(sim, "/v1/responses", {"input": items, "max_output_tokens": 2})
    assert status == 200
    assert json.loads(raw)["usage"]["input_tokens"] > 30
    status, raw = post(sim, "/v1/responses", {"input": [{"content": "no role"}]})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "body.input.0.role"


def test_an_answer_without_a_limit_ends_by_itself(sim: str) -> None:
    status, raw = post(sim, "/v1/responses", {"model": "sim-model", "input": "hello"})
    assert status == 200
    body = json.loads(raw)
    assert body["status"] == "completed"
    assert body["incomplete_details"] is None
