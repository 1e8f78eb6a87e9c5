"""app/responses_stream.py: Responses SSE in, whole untouched events out, figures read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.responses_stream import ResponsesScanner, render_error, render_stats
from app.stream_stats import EventTooLarge


def event(kind: str, seq: int, **fields: Any) -> bytes:
    data = {**fields, "sequence_number": seq, "type": kind}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


USAGE = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 3}
STREAM = (
    event("response.created", 0, response={"id": "resp_1", "status": "in_progress"})
    + event("response.in_progress", 1, response={"id": "resp_1"})
    + event("response.output_text.delta", 2, delta="a")
    + event("response.output_text.delta", 3, delta="b")
    + event("response.output_text.delta", 4, delta="c")
    + event("response.completed", 5, response={"id": "resp_1", "usage": USAGE, "output": []})
)


class Ticks:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_any_chunking_relays_the_same_bytes(size: int) -> None:
    scanner = ResponsesScanner(start_s=10.0, clock=Ticks())
    out = b"".join(scanner.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    assert out + scanner.flush() == STREAM
    assert scanner.response_id == "resp_1"
    assert scanner.done
    assert scanner.events == 6
    assert scanner.final is not None
    assert scanner.final["usage"] == USAGE
    fig = scanner.figures(estimated_prompt_tokens=99, estimated_cached_tokens=0)
    assert (fig.prompt_tokens, fig.completion_tokens, fig.cached_tokens) == (10, 3, 4)
    assert fig.token_source == "backend"
    assert fig.ttft_ms == 500.0
    assert fig.tps == 2.0


def test_the_id_is_known_before_the_created_event_is_returned() -> None:
    scanner = ResponsesScanner(start_s=0.0)
    first = STREAM[: STREAM.index(b"event: response.in_progress")]
    assert scanner.feed(first[:-1]) == b""
    assert scanner.response_id is None
    assert scanner.feed(first[-1:]) == first
    assert scanner.response_id == "resp_1"


def test_cut_stream_gives_estimates() -> None:
    scanner = ResponsesScanner(start_s=0.0)
    scanner.feed(STREAM[: STREAM.index(b"event: response.completed")])
    assert not scanner.done
    fig = scanner.figures(estimated_prompt_tokens=7, estimated_cached_tokens=9)
    assert (fig.prompt_tokens, fig.completion_tokens, fig.cached_tokens) == (7, 3, 7)
    assert fig.token_source == "estimate"


def test_error_event_and_bound() -> None:
    scanner = ResponsesScanner(start_s=0.0, max_event_bytes=1024)
    scanner.feed(event("error", 0, message="boom", code="x"))
    assert scanner.error == "boom"
    with pytest.raises(EventTooLarge):
        scanner.feed(b"event: response.output_text.delta\ndata: " + b"x" * 2000)


def test_router_events() -> None:
    stats = render_stats(6, {"backend": "b0"})
    assert stats.startswith(b"event: router.stream_stats\ndata: ")
    assert json.loads(stats.split(b"data: ", 1)[1]) == {
        "type": "router.stream_stats",
        "sequence_number": 6,
        "router_stats": {"backend": "b0"},
    }
    error = json.loads(render_error(3, "cut").split(b"data: ", 1)[1])
    assert (error["type"], error["message"], error["sequence_number"]) == ("error", "cut", 3)
