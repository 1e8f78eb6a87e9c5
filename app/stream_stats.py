"""SSE scanner for relayed streams, and the `router.stream_stats` message (sans-IO).

`StreamScanner.feed(bytes)` returns the bytes to forward now: whole events, untouched, minus the
usage chunk the router injected (when the client did not ask for it) and minus `data: [DONE]`,
which the relay sends itself after the stats event. Chunks are not JSON-decoded: the first content
chunk is found by a byte pattern, the usage chunk by its shape (`"choices":[]` and `"usage"`); only
the first event (for id/created/model) and the usage chunk are parsed.

Events end with a blank line in any of SSE's line endings (vLLM writes LF; CRLF and CR are read
too). One event may hold at most `max_event_bytes`: past that `feed` raises `EventTooLarge`, so an
upstream that never ends an event cannot grow the router's memory.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from app.config import Settings

EVENT_END = b"\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
# A delta or text that carries something: content, reasoning, tool calls, or completion text.
_CONTENT_MARKERS = (
    b'"content":"',
    b'"text":"',
    b'"reasoning_content":"',
    b'"reasoning":"',
    b'"tool_calls":[{',
)

_CHOICES_OPEN = b'"choices":[{'
_CHOICES_EMPTY = b'"choices":[]'
_DONE_DATA = b"data: [DONE]"
_ERROR_DATA = b'data: {"error"'
# A chunk that ends a choice ("finish_reason":"length" etc.; a null reason has no quote).
_FINISH = b'"finish_reason":"'

TokenSource = Literal["backend", "estimate"]
# A blank line: two line ends, each CRLF, a lone CR or LF (a CR before LF is never split off).
_EVENT_END_ANY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
DEFAULT_MAX_EVENT_BYTES = 4 << 20


class EventTooLarge(ValueError):
    """The upstream sent more than `max_event_bytes` without ending an event."""


# How the stats go out: `chunk` is a plain `data:` chunk every SSE reader accepts; `event` adds an
# `event: router.stream_stats` line, which naive readers (e.g. `vllm bench serve`) cannot parse.
StatsFormat = Literal["none", "chunk", "event"]
STATS_NAME = "router.stream_stats"
STATS_NAME_FIELD = "kvroute_event"
_STATS_OFF = frozenset(("0", "false", "off", "no"))


def _has_content(event: bytes) -> bool:
    for marker in _CONTENT_MARKERS:
        pos = event.find(marker)
        # An empty string ("content":"") is vLLM's role-only first chunk, not content.
        if pos >= 0 and event[pos + len(marker) : pos + len(marker) + 1] != b'"':
            return True
    return False


def with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    """`event` with `"system_fingerprint"` added to its JSON object, unless it has one."""
    end = event.rfind(b"}")
    if end < 0 or b'"system_fingerprint"' in event:
        return event
    return event[:end] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + event[end:]


def _payload(event: bytes) -> Any:
    start = event.find(b"data:")
    if start < 0:
        return None
    try:
        return orjson.loads(event[start + 5 :].strip())
    except orjson.JSONDecodeError:
        return None


class StreamScanner:
    def __init__(
        self,
        *,
        strip_usage: bool,
        start_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.strip_usage = strip_usage
        self.max_event_bytes = max_event_bytes
        self._any_line_ends = False  # set at the first CR seen: events split by _EVENT_END_ANY
        self.start_s = start_s
        self._clock = clock
        self._tail = b""
        self.meta: dict[str, Any] | None = None  # id, created, model, object of the stream
        self.first_content_s: float | None = None
        self.last_content_s: float | None = None
        self.content_events = 0
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self.bytes_in = 0
        self._held = b""  # a finishing chunk waiting to see whether the usage chunk follows
        self._fingerprint: str | None = None

    def feed(self, data: bytes) -> bytes:
        self.bytes_in += len(data)
        if self._any_line_ends or b"\r" in data:
            self._any_line_ends = True
            return self._feed_any(data)
        buffer = self._tail + data if self._tail else data
        end = buffer.rfind(EVENT_END)
        if end < 0:
            self._tail = self._bounded(buffer)
            return b""
        if end + 2 == len(buffer):
            complete, self._tail = buffer, b""
        else:
            complete, self._tail = buffer[: end + 2], self._bounded(buffer[end + 2 :])
        if (
            self.first_content_s is not None
            and self.meta is not None
            and _CHOICES_EMPTY not in complete
            and _DONE_DATA not in complete
            and _ERROR_DATA not in complete
            and not (self.strip_usage and _FINISH in complete)
        ):
            # Steady state: only content chunks, relayed whole. Each event holds at most one
            # `"choices":[{` outside its strings (JSON escapes quotes inside them), so a count
            # of the block is the count of its content events; one clock read stands for all.
            events = complete.count(_CHOICES_OPEN)
            if events:
                self.content_events += events
                self.last_content_s = self._clock()
            return complete
        if complete.count(EVENT_END) == 1:
            return self._emit(complete)
        return b"".join(self._emit(event + EVENT_END) for event in complete.split(EVENT_END)[:-1])

    def _feed_any(self, data: bytes) -> bytes:
        """`feed` for streams that use CR or CRLF line ends: events split one by one."""
        buffer = self._tail + data
        # A CR at the very end may be the first half of a CRLF: it waits for the next bytes.
        search_end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END_ANY.finditer(buffer, 0, search_end):
            out.append(self._emit(buffer[start : match.end()]))
            start = match.end()
        self._tail = self._bounded(buffer[start:])
        return b"".join(out)

    def _bounded(self, tail: bytes) -> bytes:
        if len(tail) > self.max_event_bytes:
            raise EventTooLarge(
                f"the backend sent more than {self.max_event_bytes} bytes without ending an "
                "SSE event"
            )
        return tail

    def flush(self) -> bytes:
        """What is left when upstream ends: a held chunk, an event without its blank line."""
        tail, self._tail = self._tail, b""
        out = b""
        if tail.strip():
            out = self._emit(tail.rstrip(b"\r\n") + EVENT_END)
        held, self._held = self._held, b""
        return held + out

    def abort(self) -> bytes:
        """The stream broke: the held finishing chunk (whole) still goes out; a partial event
        does not."""
        held, self._held, self._tail = self._held, b"", b""
        return held

    def _emit(self, event: bytes) -> bytes:
        """The bytes to forward for one whole event.

        vLLM moves `system_fingerprint` from the finishing chunk to the usage chunk when usage is
        asked for; when the router strips a usage chunk it asked for itself, the finishing chunk
        (held back one event) gets the fingerprint back, so the client sees what it would have."""
        keep = self._inspect(event)
        held = self._held
        if keep and self.strip_usage and _FINISH in event:
            self._held = event
            return held
        self._held = b""
        if held and self._fingerprint is not None:
            held = with_fingerprint(held, self._fingerprint)
            self._fingerprint = None
        return held + event if keep else held

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; return whether to forward it."""
        if event.startswith(_DONE_DATA):
            self.done = True
            return False
        if self.meta is None:
            payload = _payload(event)
            if isinstance(payload, dict) and "error" not in payload:
                self.meta = {k: payload.get(k) for k in ("id", "created", "model", "object")}
        if _CHOICES_EMPTY in event and b'"usage"' in event:
            payload = _payload(event)
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                self.usage = payload["usage"]
                fingerprint = payload.get("system_fingerprint")
                if self.strip_usage and isinstance(fingerprint, str):
                    self._fingerprint = fingerprint
                return not self.strip_usage
        if event.startswith(_ERROR_DATA):
            payload = _payload(event)
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                self.error = payload["error"]
            return True
        if self.first_content_s is None:
            if _has_content(event):
                self.first_content_s = self.last_content_s = self._clock()
                self.content_events = 1
        elif _CHOICES_OPEN in event:
            self.content_events += 1
            self.last_content_s = self._clock()
        return True


@dataclass(frozen=True, slots=True)
class StreamFigures:
    ttft_ms: float | None
    tps: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    novel_tokens: int
    token_source: TokenSource


def usage_figures(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, cached) from an OpenAI usage object; missing details mean 0 cached."""
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
        reported_cached(usage) or 0,
    )


def reported_cached(usage: dict[str, Any]) -> int | None:
    """`prompt_tokens_details.cached_tokens`, or None when the usage has none: vLLM fills it
    only with --enable-prompt-tokens-details, and some versions leave it out when it is 0."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) else None


def figures(
    scanner: StreamScanner, *, estimated_prompt_tokens: int, estimated_cached_tokens: int
) -> StreamFigures:
    """Exact figures from vLLM's usage chunk when it came, else the router's estimates."""
    return stream_figures(
        start_s=scanner.start_s,
        first_content_s=scanner.first_content_s,
        last_content_s=scanner.last_content_s,
        exact=usage_figures(scanner.usage) if scanner.usage is not None else None,
        content_events=scanner.content_events,
        estimated_prompt_tokens=estimated_prompt_tokens,
        estimated_cached_tokens=estimated_cached_tokens,
    )


def stream_figures(
    *,
    start_s: float,
    first_content_s: float | None,
    last_content_s: float | None,
    exact: tuple[int, int, int] | None,
    content_events: int,
    estimated_prompt_tokens: int,
    estimated_cached_tokens: int,
) -> StreamFigures:
    """A stream's figures (any SSE dialect): `exact` (prompt, completion, cached) from the
    backend's usage when it came, else estimates with one token per content event."""
    if exact is not None:
        prompt, completion, cached = exact
        source: TokenSource = "backend"
    else:
        prompt, completion = estimated_prompt_tokens, content_events
        cached, source = min(estimated_cached_tokens, prompt), "estimate"
    ttft_ms = tps = None
    if first_content_s is not None and last_content_s is not None:
        ttft_ms = round((first_content_s - start_s) * 1000, 3)
        span = last_content_s - first_content_s
        if span > 0 and completion > 1:
            tps = round((completion - 1) / span, 2)
    return StreamFigures(
        ttft_ms=ttft_ms,
        tps=tps,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        novel_tokens=max(prompt - cached, 0),
        token_source=source,
    )


def stats_format(header_value: str | None, settings: Settings) -> StatsFormat:
    """The stats form for one stream, from `X-Router-Stream-Stats` and the settings.

    `STREAM_STATS=false` wins over any header (the figures name backends and tenants); `0`, `off`
    etc. turn them off; `chunk` or `event` picks a form; anything else means the configured form.
    """
    if not settings.stream_stats:
        return "none"
    value = (header_value or "").strip().lower()
    if value in _STATS_OFF:
        return "none"
    if value == "chunk":
        return "chunk"
    if value == "event":
        return "event"
    return settings.stream_stats_format


def render_stats_event(
    meta: dict[str, Any] | None,
    default_object: str,
    stats: dict[str, Any],
    form: Literal["chunk", "event"] = "chunk",
) -> bytes:
    """The stats message: a chunk like the stream's own (same id/created/model/object,
    `choices: []`, no `usage`), so OpenAI clients iterate it as a no-op; the name goes inside
    (`kvroute_event`) and, in the `event` form, also on an `event:` line."""
    meta = meta or {}
    body: dict[str, Any] = {
        "id": meta.get("id") or "",
        "object": meta.get("object") or default_object,
        "created": meta.get("created") or int(time.time()),
        "model": meta.get("model") or "",
        "choices": [],
        STATS_NAME_FIELD: STATS_NAME,
        "router_stats": stats,
    }
    data = b"data: " + orjson.dumps(body) + EVENT_END
    return b"event: " + STATS_NAME.encode() + b"\n" + data if form == "event" else data


def read_stats(event: bytes) -> dict[str, Any] | None:
    """The figures if `event` (one SSE message, either form) is the router's stats, else None."""
    if STATS_NAME_FIELD.encode() not in event:
        return None
    payload = _payload(event)
    if not isinstance(payload, dict) or payload.get(STATS_NAME_FIELD) != STATS_NAME:
        return None
    stats = payload.get("router_stats")
    return stats if isinstance(stats, dict) else None


def render_error_event(message: str, *, code: int = 502, type_: str = "upstream_error") -> bytes:
    """An OpenAI-style error event for failures after the first byte (vLLM sends the same shape)."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + EVENT_END
