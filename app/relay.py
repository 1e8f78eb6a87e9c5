"""Relaying an upstream answer to the client.

`relay_stream` forwards an SSE stream through the `StreamScanner` (whole events, untouched bytes)
and reports how it ended; the caller adds the closing bytes (error event, stats, `[DONE]`).
A `Sink` is where the bytes go: straight to the client with chunked transfer, or, for an
HTTP/1.0 client (which cannot read chunked bodies), gathered up to a limit and sent once with
its Content-Length.
"""

from __future__ import annotations

from app.errors import UpstreamBroken
from app.exchange import Call, Headers
from app.stream_stats import EventTooLarge, StreamScanner
from app.transport import UpstreamResponse

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


class Sink:
    """The client side of a relayed stream."""

    __slots__ = ("_buffer", "_call", "_headers", "_limit", "_send", "_size", "_status")

    def __init__(self, call: Call, *, http10_limit: int) -> None:
        self._call = call
        self._send = call.send_raw  # the hot path: one ASGI message per relayed chunk
        self._buffer: list[bytes] | None = [] if call.http10 else None
        self._limit = http10_limit
        self._size = 0
        self._status = 200
        self._headers: Headers = []

    async def start(self, status: int, headers: Headers) -> None:
        if self._buffer is None:
            await self._call.start(status, headers)
        else:
            self._status, self._headers = status, headers

    async def write(self, data: bytes) -> None:
        if self._buffer is None:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
            return
        self._size += len(data)
        if self._size > self._limit:
            raise UpstreamBroken(
                f"the stream is longer than {self._limit} bytes, the most this router gathers "
                "for an HTTP/1.0 client (use HTTP/1.1 to stream)"
            )
        self._buffer.append(data)

    async def finish(self, data: bytes) -> None:
        if self._buffer is None:
            await self._call.body(data, more=False)
            return
        body = b"".join(self._buffer) + data
        self._headers.append((b"content-length", str(len(body)).encode()))
        await self._call.start(self._status, self._headers)
        await self._call.body(body, more=False)


async def relay_stream(
    sink: Sink, response: UpstreamResponse, scanner: StreamScanner, headers: Headers
) -> str | None:
    """Relay the stream until upstream ends it; None when it ended with `[DONE]`, else why not.

    A client that leaves cancels this where it waits; the caller's `async with` closes upstream."""
    await sink.start(200, headers)
    read, feed, write = response.read_chunk, scanner.feed, sink.write
    try:
        while chunk := await read():
            out = feed(chunk)
            if out:
                await write(out)
        out = scanner.flush()
        if out:
            await sink.write(out)
    except UpstreamBroken as exc:
        return f"upstream failed mid-stream: {exc.message}"
    except EventTooLarge as exc:
        return str(exc)
    return None if scanner.done else "upstream stream ended before [DONE]"


async def relay_raw(sink: Sink, response: UpstreamResponse, headers: Headers) -> None:
    """Relay bytes as they come (a passthrough endpoint that streams)."""
    await sink.start(response.status, headers)
    while chunk := await response.read_chunk():
        await sink.write(chunk)
    await sink.finish(b"")
