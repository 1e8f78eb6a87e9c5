"""The client-facing HTTP listener: uvicorn's httptools protocol with the limits it lacks.

uvicorn's httptools protocol (the fast one; h11 costs several times its CPU) puts no bound on
request headers or on the time a client takes to send them, and starts every connection it
accepts. `GuardedHttpToolsProtocol` adds, per connection:
- header bytes before the end of the headers (`MAX_HEADER_BYTES`) and header count
  (`MAX_HEADERS`): past either, 431 and the connection is closed;
- a deadline to finish the headers (`HEADER_TIMEOUT_S`), from the connection's start or from
  the first bytes of a later request on it: a slow or silent client is cut (408 when it had
  begun a request; an idle kept-alive connection is closed by uvicorn's keep-alive timeout);
- a deadline to send the whole body (`BODY_TIMEOUT_S`), from the end of the headers: past
  it, 408 (or a cut, when the answer had begun) and close;
- open connections at once (`MAX_CONNECTIONS`): past it, 503 and close;
- requests pipelined ahead of their answers (`MAX_PIPELINED`): uvicorn parses every request in a
  read before it pauses reading, so 8000 tiny pipelined requests (250 KB) held 1.8 MB per
  connection; past the bound the connection is cut (no client pipelines that deep: browsers do
  not pipeline at all);
- a client that takes none of its answer for `SEND_TIMEOUT_S` while the send buffer is full
  (the router waits on it), or less than `SEND_MIN_BYTES_PER_S` on average over that much
  waiting, is cut: aborted, so its request ends as a departure (slot freed, upstream closed).
  Only time spent waiting on the client counts, so a client slower than the generation is not
  cut for it, while one that takes a few bytes a minute no longer holds its slot for good.
A refused connection is closed gracefully: the refusal, then our side's FIN, then what the
client still sends is read and dropped (up to LINGER_BYTES, for LINGER_S at most). Closing at
once with its bytes unread makes the kernel answer with a reset, which can destroy the
refusal before the client reads it (seen as "connection reset" instead of a 431).
Limits travel as a frozen value in a `functools.partial`, so worker processes get them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.config import Settings
from app.exchange import CUT_KEY

try:  # the kernel's unsent bytes of a socket (Linux's SIOCOUTQ); not on Windows
    import fcntl
    import termios

    OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover
    OUTQ = None

log = logging.getLogger("kvroute.listener")

LINGER_S = 2.0
LINGER_BYTES = 1 << 20
MAX_PIPELINED = 32  # requests parsed and waiting behind the one being answered, per connection


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = 4096
    send_timeout_s: float = 60.0
    send_min_bytes_per_s: int = 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ListenerLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
            send_timeout_s=settings.send_timeout_s,
            send_min_bytes_per_s=settings.send_min_bytes_per_s,
        )


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "service_unavailable",
                "param": None,
                "code": reason,
            }
        }
    )
    phrase = {408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(
        status, "Service Unavailable"
    )
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_headers = (
            True  # between a request's start (or the connection's) and its headers' end
        )
        self._header_bytes = 0  # raw bytes received while the headers are incomplete
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._dropped = 0  # bytes read and dropped after a refusal
        self._stall: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._unsent = 0  # bytes the client had yet to take when writing paused
        self._answering: RequestResponseCycle | None = None  # the request being answered
        self._paused_at = 0.0  # loop time writing paused
        # The window under check: seconds spent waiting on the client, and bytes it took then.
        self._waited_s = 0.0
        self._taken = 0

    # --- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections", "the router has too many open connections")
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        self._disarm_stall()
        # uvicorn tells the departure to `self.cycle`, the last request parsed; behind pipelined
        # requests that is one never started, and the one being answered would stream on into
        # the closed connection, its slot held. The queued ones never run.
        if self._answering is not None:
            self.cycle = self._answering
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._disarm_stall()
        self._paused_at, self._unsent = self.loop.time(), _unsent(self.transport)
        window_s = self.limits.send_timeout_s
        self._stall = self.loop.call_later(max(window_s - self._waited_s, 0.0), self._check_stall)

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._disarm_stall()
            self._waited_s += self.loop.time() - self._paused_at
            self._taken += max(self._unsent - _unsent(self.transport), 0)
        super().resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if len(self.pipeline) > MAX_PIPELINED:
            self._cut_pipeline()
            return
        if self._in_headers and self._deadline is None and not self._refused:
            # Headers begun but not complete in one read (rare: most arrive in one): the
            # deadline starts now. Idle keep-alive connections are uvicorn's keep-alive timer's.
            self._arm_deadline()
        # Headers not yet complete: what the parser holds is bounded by this raw count (complete
        # ones are measured exactly in `on_headers_complete`, body bytes not held against them).
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse_new(
                431,
                "headers_too_large",
                f"request headers exceed {self.limits.max_header_bytes} bytes",
            )

    def on_response_complete(self) -> None:
        queued = self.pipeline[-1][0] if self.pipeline else None
        super().on_response_complete()
        if queued is not None and (not self.pipeline or self.pipeline[-1][0] is not queued):
            self._answering = queued  # the oldest queued request, started now
        # The next request on this connection is held to the same limits (its deadline starts
        # with its first bytes, in `data_received`).
        self._in_headers, self._header_bytes = True, 0

    # --- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        # The raw count guards headers not yet complete; these are measured below. Bytes of
        # earlier requests in the same read (pipelined) must not count against the next one.
        self._header_bytes = 0
        self._disarm_deadline()
        # Complete headers, measured as parsed (their count is bounded by the raw bytes).
        headers = self.headers
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.limits.max_header_bytes:
            self._refuse_new(
                431,
                "headers_too_large",
                f"request headers exceed {self.limits.max_header_bytes} bytes",
            )
            return
        if len(headers) > self.limits.max_headers:
            self._refuse_new(
                431,
                "too_many_headers",
                f"the request has {len(headers)} headers; the limit is {self.limits.max_headers}",
            )
            return
        super().on_headers_complete()
        if not (self.pipeline and self.pipeline[0][0] is self.cycle):
            self._answering = self.cycle  # started at once, not queued
        # The body's deadline (disarmed at once by `on_message_complete` when there is none).
        self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_deadline()
        if not self._refused:
            super().on_message_complete()

    # --- limits --------------------------------------------------------------------------
    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._in_headers or self.transport.is_closing():
            return
        if self._header_bytes:
            self._refuse_new(
                408,
                "header_timeout",
                f"request headers not received within {self.limits.header_timeout_s:g} s",
            )
        else:
            self._refused = True
            self.transport.close()  # an idle connection: nothing to answer

    def _disarm_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _check_stall(self) -> None:
        """SEND_TIMEOUT_S of waiting on the client in all (this pause and earlier ones since
        the last check): it must have taken something, and at least the minimum rate."""
        self._stall = None
        now, unsent = self.loop.time(), _unsent(self.transport)
        waited_s = self._waited_s + now - self._paused_at
        taken = self._taken + max(self._unsent - unsent, 0)
        least = self.limits.send_min_bytes_per_s * waited_s
        if taken and taken >= least:  # a new window, from now
            self._waited_s, self._taken = 0.0, 0
            self._paused_at, self._unsent = now, unsent
            window_s = self.limits.send_timeout_s
            self._stall = self.loop.call_later(window_s, self._check_stall)
            return
        peer = _peer(self.transport)
        if taken:
            log.warning(
                "client %s took %d bytes in %.3g s of the router waiting on it, under "
                "SEND_MIN_BYTES_PER_S=%d: connection cut",
                peer,
                taken,
                waited_s,
                self.limits.send_min_bytes_per_s,
            )
            self._mark_cut("SendTooSlow")
        else:
            log.warning(
                "client %s took none of its answer for %g s: connection cut",
                peer,
                self.limits.send_timeout_s,
            )
            self._mark_cut("SendStalled")
        _reset(self.transport)

    def _cut_pipeline(self) -> None:
        log.warning(
            "client %s pipelined more than %d requests ahead of their answers: connection cut",
            _peer(self.transport),
            MAX_PIPELINED,
        )
        self._mark_cut("PipelineTooDeep")
        self._drop()

    def _mark_cut(self, kind: str) -> None:
        """Tell the request's handler (`Call.cut`) that the router, not its client, ended it."""
        cycle = self._answering
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CUT_KEY] = kind  # type: ignore[literal-required]

    def _body_late(self) -> None:
        self._deadline = None
        if self._refused or self.transport.is_closing():
            return
        self._mark_cut("BodyTimeout")
        if self.cycle is not None and self.cycle.response_started:
            _reset(self.transport)  # an answer begun before its body ended: nothing to say
            return
        # The handler waiting for the rest of the body gets a departure when the connection
        # closes, so it answers nothing itself.
        self._refuse(
            408,
            "body_timeout",
            f"request body not received within {self.limits.body_timeout_s:g} s",
        )

    def _refuse_new(self, status: int, reason: str, message: str) -> None:
        """Refuse a request not yet begun; behind one still being answered (pipelined), an
        answer cannot be put in its place, so the connection is cut instead."""
        if self.cycle is not None and not self.cycle.response_complete:
            log.warning(
                "client %s: %s behind a request still being answered: connection cut",
                _peer(self.transport),
                message,
            )
            self._drop()
            return
        self._refuse(status, reason, message)

    def _drop(self) -> None:
        """Reset the connection with nothing said; requests queued behind the one being
        answered never started and go with it."""
        self._refused = True
        self._disarm_deadline()
        self.pipeline.clear()
        _reset(self.transport)

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._disarm_deadline()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_refusal(status, reason, message))
        if not transport.can_write_eof():
            transport.close()
            return
        # Linger (see the module's docstring): the client's EOF closes it (uvicorn's
        # `eof_received`), else the timer; the deadline handle is reused, so it is cancelled
        # with the connection.
        transport.write_eof()
        transport.resume_reading()
        self._deadline = self.loop.call_later(LINGER_S, transport.close)


def _reset(transport: asyncio.Transport) -> None:
    """Cut the connection with a reset. `abort()` drops the transport's buffer, but the kernel
    would still send what its queue holds (megabytes, to a client that reads a few bytes a
    second) before its FIN; with a zero linger the close resets and frees that queue at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes the client has yet to take: the transport's buffer and the kernel's send queue.
    The kernel's counts: a client reading slowly empties it long before the socket turns
    writable again (a third of it must be free), so the buffer alone would look stalled."""
    queued = 0
    sock = transport.get_extra_info("socket")
    if sock is not None and OUTQ is not None:
        try:
            raw = fcntl.ioctl(sock.fileno(), OUTQ, b"\0\0\0\0")
            queued = int.from_bytes(raw, sys.byteorder, signed=True)
        except OSError:
            queued = 0  # not a socket it answers for, or closed: the buffer alone
    return transport.get_write_buffer_size() + queued


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def protocol_for(settings: Settings) -> functools.partial[GuardedHttpToolsProtocol]:
    """What to give uvicorn as `http=`: the guarded protocol with these settings' limits."""
    return functools.partial(
        GuardedHttpToolsProtocol, limits=ListenerLimits.from_settings(settings)
    )
