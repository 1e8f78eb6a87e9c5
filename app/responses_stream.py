"""Scanner for relayed Responses API streams, and the events the router adds to them (sans-IO).

vLLM's Responses streams are `event: <type>\\ndata: <json>\\n\\n` with a `sequence_number`, and
end with `response.completed` (or `.incomplete` / `.failed`), without `[DONE]`. `feed(bytes)`
returns whole events, untouched; it parses only `response.created` (the response id, recorded as
its owner before the event reaches the client) and the final event (usage, output); text deltas
are counted by their line prefix.

The router's stats go out after the final event as `event: router.stream_stats` with
`"type": "router.stream_stats"`: the official `openai` client (sync, async, and the
`responses.stream()` helper) passes an event type it does not know through as a plain object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from app.stream_stats import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    StreamFigures,
    stream_figures,
)

EVENT_END = b"\n\n"
_DELTA = b"event: response.output_text.delta\n"
_CREATED = b"event: response.created\n"
_FINAL = (
    b"event: response.completed\n",
    b"event: response.incomplete\n",
    b"event: response.failed\n",
)
_ERROR = b"event: error\n"


def _data(event: bytes) -> Any:
    start = event.find(b"\ndata:")
    if start < 0:
        return None
    try:
        return orjson.loads(event[start + 6 :])
    except orjson.JSONDecodeError:
        return None


class ResponsesScanner:
    def __init__(
        self,
        *,
        start_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.start_s = start_s
        self._clock = clock
        self.max_event_bytes = max_event_bytes
        self._tail = b""
        self.bytes_in = 0
        self.events = 0  # events seen: the next sequence_number, as vLLM numbers from 0
        self.response_id: str | None = None
        self.final: dict[str, Any] | None = None  # the response of the last event
        self.error: str | None = None
        self.done = False
        self.first_content_s: float | None = None
        self.last_content_s: float | None = None
        self.deltas = 0

    def feed(self, data: bytes) -> bytes:
        self.bytes_in += len(data)
        buffer = self._tail + data if self._tail else data
        end = buffer.rfind(EVENT_END)
        if end < 0:
            self._tail = self._bounded(buffer)
            return b""
        complete, self._tail = buffer[: end + 2], self._bounded(buffer[end + 2 :])
        for event in complete.split(EVENT_END)[:-1]:
            self._inspect(event)
        return complete

    def flush(self) -> bytes:
        """An event the upstream ended without its blank line (passed on as it came)."""
        tail, self._tail = self._tail, b""
        if tail.strip():
            self._inspect(tail)
            return tail + EVENT_END
        return b""

    def _bounded(self, tail: bytes) -> bytes:
        if len(tail) > self.max_event_bytes:
            raise EventTooLarge(
                f"the backend sent more than {self.max_event_bytes} bytes without ending an "
                "SSE event"
            )
        return tail

    def _inspect(self, event: bytes) -> None:
        self.events += 1
        if event.startswith(_DELTA):
            now = self._clock()
            if self.first_content_s is None:
                self.first_content_s = now
            self.last_content_s = now
            self.deltas += 1
        elif event.startswith(_CREATED):
            payload = _data(event)
            response = payload.get("response") if isinstance(payload, dict) else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.response_id = response["id"]
        elif event.startswith(_FINAL):
            payload = _data(event)
            response = payload.get("response") if isinstance(payload, dict) else None
            self.final = response if isinstance(response, dict) else {}
            self.done = True
        elif event.startswith(_ERROR):
            payload = _data(event)
            message = payload.get("message") if isinstance(payload, dict) else None
            self.error = str(message or "error event from the backend")

    def figures(self, estimated_prompt_tokens: int, estimated_cached_tokens: int) -> StreamFigures:
        """Exact token counts from the final event's usage when it came, else estimates."""
        usage = (self.final or {}).get("usage")
        return stream_figures(
            start_s=self.start_s,
            first_content_s=self.first_content_s,
            last_content_s=self.last_content_s,
            exact=usage_tokens(usage) if isinstance(usage, dict) else None,
            content_events=self.deltas,
            estimated_prompt_tokens=estimated_prompt_tokens,
            estimated_cached_tokens=estimated_cached_tokens,
        )


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(input, output, cached) tokens of a Responses `usage` object."""
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    return (
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
        cached if isinstance(cached, int) else 0,
    )


def render_event(kind: str, sequence_number: int, fields: dict[str, Any]) -> bytes:
    body = {"type": kind, "sequence_number": sequence_number, **fields}
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + EVENT_END


def render_stats(sequence_number: int, stats: dict[str, Any]) -> bytes:
    return render_event("router.stream_stats", sequence_number, {"router_stats": stats})


def render_error(sequence_number: int, message: str) -> bytes:
    """The Responses stream's own error event (what the openai client reads as an error)."""
    return render_event(
        "error", sequence_number, {"code": "upstream_error", "message": message, "param": None}
    )
