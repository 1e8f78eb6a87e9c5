"""A lean HTTP/1.1 client for the hot path: httptools parsing on pooled asyncio connections.

Why not aiohttp: per streamed request its request, response and stream objects cost about a
quarter of the router's CPU (#16's profile). The router needs little of what they offer: one
request with a known body, a status, a header or two, and body bytes as they arrive. Here a
connection is one `asyncio.Protocol` whose httptools parser appends body bytes to a list; a
read returns everything buffered since the last one, so a burst of SSE events is one chunk.

Semantics kept from `transport.Transport`: failing to get an answer is `UpstreamUnavailable`,
failing after it began is `UpstreamBroken`; `read_timeout_s` bounds every wait for bytes and
`total_timeout_s` the whole exchange; a response read to its end returns its connection to the
pool, anything else closes it (vLLM then aborts the request). A request that meets a kept-alive
connection the backend had just closed (the keep-alive race: no byte of an answer came back) is
sent once more on a new connection instead of failing the backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import socket
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

from app.errors import UpstreamBroken, UpstreamUnavailable
from app.looplag import LoopLag, lag_deadline
from app.transport import Decoder, UpstreamResponse, decoder_for, describe, read_decoded

# Body bytes buffered before the socket stops being read (the reader drains all of it at once).
HIGH_WATER = 256 << 10
# A backend's status line and headers, at most (vLLM's take a few hundred bytes): past it the
# answer is broken, not buffered on and on.
MAX_HEAD_BYTES = 64 << 10
# A connect gives up after this many times its timeout of wall time, however busy the loop.
CONNECT_CAP_FACTOR = 4
# Idle connections kept per backend, at most: more than this were never needed at once lately.
MAX_IDLE_PER_HOST = 256
_READ_ERRORS: tuple[type[BaseException], ...] = (UpstreamBroken,)


class _Stale(Exception):
    """A reused connection closed before any byte of an answer: safe to send again."""


@functools.lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[tuple[str, int, bool], str, str]:
    """(host, port, tls), the Host header and the request target of an absolute URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnavailable(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, port, tls), parts.netloc, target


def encode_head(
    method: str, target: str, host: str, headers: Mapping[str, str], length: int | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
            raise UpstreamUnavailable(f"header {name!r} cannot be sent: it holds a line break")
        lines.append(f"{name}: {value}\r\n")
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


class Connection(asyncio.Protocol):
    """One TCP connection and the exchange in progress on it (one at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.exchanges = 0
        self._reset()

    def _reset(self) -> None:
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # no length and not chunked: the body ends with the connection
        self.encoding: str | None = None  # Content-Encoding
        self.error: UpstreamBroken | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.active = False
        self.got_bytes = False
        self.head_bytes = 0

    def begin(self) -> None:
        if self.exchanges:
            self.parser = httptools.HttpResponseParser(self)
            self._reset()
        self.exchanges += 1
        self.active = True

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small SSE requests and answers must not wait for Nagle (uvloop sets it already).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"the backend's answer is not valid HTTP/1.1 ({exc})")
            self.abort()
            return
        if not self.head_done:  # all of `data` went to the head, which the parser holds
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.fail(f"the backend's response headers exceed {MAX_HEAD_BYTES} bytes")
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active or self.complete or self.error is not None:
            return
        if self.head_done and self.until_close:
            self.complete = True
            self._wake()
        elif self.head_done:
            self.fail("the backend closed the connection mid-answer")
        else:
            self.fail("the backend closed the connection before answering")

    # --- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        framed = False
        for name, value in self.raw_headers:  # one pass for what the client itself needs
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                framed = True
            elif lower == b"content-encoding":
                self.encoding = value.decode("latin-1")
        self.until_close = not framed and self.status not in (204, 304)
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # --- the exchange --------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = UpstreamBroken(message)
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def wait(self, timeout_s: float, deadline: float | None) -> None:
        """Until the parser has news (headers, bytes, the end, an error) or the time is up."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        when = self.loop.time() + timeout_s
        total = deadline is not None and deadline < when
        if deadline is not None and total:
            when = deadline
        timer = self.loop.call_at(when, self._time_up, waiter, timeout_s, total)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _time_up(self, waiter: asyncio.Future[None], timeout_s: float, total: bool) -> None:
        if waiter.done():  # news came in the same loop turn
            return
        if total:
            self.fail("the request's total time ran out")
        elif self.head_done:
            self.fail(f"the backend sent nothing for {timeout_s:g} s")
        else:
            self.fail(f"the backend did not answer within {timeout_s:g} s")
        self.abort()


class Response:
    """The answer on a connection, read in chunks; `close()` gives the connection back."""

    __slots__ = (
        "_conn",
        "_deadline",
        "_headers",
        "_pool",
        "_read_timeout_s",
        "read_chunk",
        "read_errors",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        pool: HostPool,
        read_timeout_s: float,
        deadline: float | None,
        decoder: Decoder | None,
    ) -> None:
        self._conn: Connection | None = conn
        self._pool = pool
        self._read_timeout_s = read_timeout_s
        self._deadline = deadline
        self._headers: dict[str, str] | None = None
        self.status = conn.status
        self.read_errors = _READ_ERRORS
        self.read_chunk = (
            self._read if decoder is None else functools.partial(read_decoded, self._read, decoder)
        )

    def header(self, name: str) -> str | None:
        if self._headers is None:
            conn = self._conn
            raw = conn.raw_headers if conn is not None else []
            # The first of a repeated header wins (as aiohttp's `get`).
            self._headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in reversed(raw)
            }
        return self._headers.get(name)

    async def _read(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise UpstreamBroken("the response was closed")
        while True:
            chunks = conn.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                conn.chunks = []
                conn.buffered = 0
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                return data
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            await conn.wait(self._read_timeout_s, self._deadline)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        reusable = conn.complete and conn.keep_alive and conn.error is None and not conn.closed
        if not reusable:  # a reader still waiting (a backend cut while it relays) learns at once
            conn.fail("the response was closed")
        self._pool.release(conn, reusable)


class HostPool:
    """Connections to one backend: idle ones reused newest first, at most `limit` open."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: tuple[str, int, bool],
        *,
        limit: int,
        connect_timeout_s: float,
        idle_timeout_s: float,
        tls: ssl.SSLContext | None,
        lag: LoopLag,
    ) -> None:
        self.loop = loop
        self.host, self.port, _ = address
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.lag = lag
        self.idle_timeout_s = idle_timeout_s
        self.tls = tls
        self.idle: list[Connection] = []
        self.busy = 0  # connections handed out (or being opened)
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, *, fresh: bool = False) -> Connection:
        if self.busy >= self.limit:
            await self._wait_turn()
        self.busy += 1
        try:
            conn = None if fresh else self._idle_connection()
            return conn if conn is not None else await self._connect()
        except BaseException:
            self._give_back()
            raise

    def _idle_connection(self) -> Connection | None:
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout_s:
                return conn
            conn.abort()
        return None

    async def _wait_turn(self) -> None:
        while self.busy >= self.limit:
            turn = self.loop.create_future()
            self.waiters.append(turn)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._wake_one()  # the turn given to us goes to the next
                raise

    async def _connect(self) -> Connection:
        # The backend has `connect_timeout_s` of a responsive loop to accept: a loop (or process)
        # too busy to run the connect's callback in time is not the backend's failure, and must
        # not send its requests elsewhere or trip its breaker. The cap bounds the wait anyway.
        try:
            async with lag_deadline(
                self.connect_timeout_s, self.lag, CONNECT_CAP_FACTOR * self.connect_timeout_s
            ):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self.loop), self.host, self.port, ssl=self.tls
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {self.host}:{self.port} ({describe(exc)})"
            ) from exc
        return conn

    def release(self, conn: Connection, reusable: bool) -> None:
        """The exchange on `conn` is over: kept for the next one, or closed."""
        conn.active = False
        if reusable and len(self.idle) < MAX_IDLE_PER_HOST:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
        else:
            conn.abort()
        self._give_back()

    def _give_back(self) -> None:
        self.busy -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


class HttpToolsTransport:
    """The hot-path `Transport`: one pool per backend address for the app's lifetime."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        pool_idle_timeout_s: float,
        max_per_host: int,
        lag: LoopLag | None = None,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._lag = lag or LoopLag()  # one nobody runs: the connect timeout is wall time
        self._idle_timeout_s = pool_idle_timeout_s
        self._max_per_host = max_per_host
        self._pools: dict[tuple[str, int, bool], HostPool] = {}
        self._tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> HttpToolsTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, address: tuple[str, int, bool]) -> HostPool:
        pool = self._pools.get(address)
        if pool is None:
            if address[2] and self._tls is None:
                self._tls = ssl.create_default_context()
            pool = HostPool(
                asyncio.get_running_loop(),
                address,
                limit=self._max_per_host,
                connect_timeout_s=self._connect_timeout_s,
                idle_timeout_s=self._idle_timeout_s,
                tls=self._tls if address[2] else None,
                lag=self._lag,
            )
            self._pools[address] = pool
        return pool

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        *,
        read_timeout_s: float,
        total_timeout_s: float | None = None,
    ) -> UpstreamResponse:
        address, host, target = split_url(url)
        pool = self._pool(address)
        head = encode_head(method, target, host, headers, None if body is None else len(body))
        message = head + body if body else head
        deadline = None if total_timeout_s is None else pool.loop.time() + total_timeout_s
        try:
            conn = await self._answered(pool, message, read_timeout_s, deadline)
        except UpstreamBroken as exc:  # no answer: the backend is unavailable, not broken
            raise UpstreamUnavailable(exc.message) from exc
        try:
            decoder = decoder_for(conn.encoding)
        except UpstreamBroken:
            pool.release(conn, False)
            raise
        return Response(conn, pool, read_timeout_s, deadline, decoder)

    async def _answered(
        self, pool: HostPool, message: bytes, read_timeout_s: float, deadline: float | None
    ) -> Connection:
        """A connection whose answer's headers have arrived (one resend on a stale one)."""
        for fresh in (False, True):
            conn = await pool.acquire(fresh=fresh)
            try:
                return await self._exchange(conn, message, read_timeout_s, deadline)
            except _Stale:
                pool.release(conn, False)
            except BaseException:
                pool.release(conn, False)
                raise
        # (A new connection is never stale: this stays total.)
        raise UpstreamBroken("the backend closed the connection before answering")

    @staticmethod
    async def _exchange(
        conn: Connection, message: bytes, read_timeout_s: float, deadline: float | None
    ) -> Connection:
        """Send `message` and wait for the answer's headers; the caller releases `conn` when
        this raises."""
        reused = conn.exchanges > 0
        conn.begin()
        assert conn.transport is not None
        conn.transport.write(message)
        while not conn.head_done:
            if conn.error is not None:
                if reused and not conn.got_bytes and conn.closed:
                    raise _Stale()
                raise conn.error
            await conn.wait(read_timeout_s, deadline)
        return conn
