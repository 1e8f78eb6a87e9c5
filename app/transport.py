"""The wire to the backends: one `Transport` protocol, aiohttp behind it, and a mock for tests.

This is the one boundary where foreign exceptions become ours (as httpx maps httpcore's):
failing to get a response is `UpstreamUnavailable` (retryable), failing while reading one is
`UpstreamBroken`. A response in a content coding (gzip, deflate) is decoded here, in bounded
steps, so nothing above ever sees compressed bytes; a coding we cannot decode is refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import aiohttp

from app.errors import UpstreamBroken, UpstreamUnavailable

# Most bytes one decompression step may produce: a small compressed chunk cannot become a huge
# allocation (the readers above cap the total).
DECODE_STEP_BYTES = 1 << 20


class UpstreamResponse(Protocol):
    """An upstream answer whose headers have arrived; the body is read in chunks."""

    status: int
    # What `read_chunk` raises when upstream breaks: UpstreamBroken, and for a plain body read
    # straight from the socket (no extra call layer per chunk) the client library's own errors.
    read_errors: tuple[type[BaseException], ...]

    def header(self, name: str) -> str | None:
        """A response header by its lower-case name."""
        ...

    async def read_chunk(self) -> bytes:
        """The next bytes of the body (decoded), b"" at its end; raises one of `read_errors`."""
        ...

    def close(self) -> None:
        """Done with it: the connection goes back to the pool when the body was read to its end,
        else it is closed (vLLM then aborts the request). Idempotent."""
        ...


class Transport(Protocol):
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
        """Send a request and wait for the response headers; raises UpstreamUnavailable."""
        ...

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Decoder:
    """A gzip or deflate body decoded in steps of at most DECODE_STEP_BYTES."""

    def __init__(self, coding: str) -> None:
        # gzip: wbits 16+15; deflate as sent in practice may be zlib-wrapped or raw: 32+15 reads
        # zlib and gzip headers, raw deflate is tried on failure.
        self._coding = coding
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
        self._started = False

    @property
    def pending(self) -> bool:
        return bool(self._z.unconsumed_tail)

    def feed(self, data: bytes) -> bytes:
        """Decoded output (at most DECODE_STEP_BYTES); UpstreamBroken when it cannot decode."""
        try:
            out = self._z.decompress(self._z.unconsumed_tail + data, DECODE_STEP_BYTES)
        except zlib.error as exc:
            if self._coding == "deflate" and not self._started:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                self._started = True
                return self.feed(data)
            raise UpstreamBroken(f"the backend's body cannot be decoded ({exc})") from exc
        self._started = True
        return out

    def flush(self) -> bytes:
        try:
            return self._z.flush()
        except zlib.error as exc:
            raise UpstreamBroken(f"the backend's body cannot be decoded ({exc})") from exc


async def read_decoded(read: Callable[[], Awaitable[bytes]], decoder: Decoder) -> bytes:
    """The next decoded bytes of a body whose raw chunks come from `read` (b"" at the end).
    A compressed chunk may decode to nothing yet (a header): it reads on until there is output."""
    while True:
        if decoder.pending:
            out = decoder.feed(b"")
        else:
            data = await read()
            if not data:
                return decoder.flush()
            out = decoder.feed(data)
        if out:
            return out


def describe(exc: BaseException) -> str:
    """A foreign exception in one line: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def decoder_for(coding: str | None) -> Decoder | None:
    """A decoder for a Content-Encoding; None for identity; UpstreamBroken when unsupported."""
    if coding is None:
        return None
    name = coding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return Decoder("gzip")
    if name == "deflate":
        return Decoder("deflate")
    raise UpstreamBroken(
        f"the backend answered with Content-Encoding {coding!r}, which the router cannot decode"
    )


_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


_READ_ERRORS: tuple[type[BaseException], ...] = (UpstreamBroken, *_UPSTREAM_ERRORS)


class AiohttpResponse:
    __slots__ = ("_decoder", "_response", "read_chunk", "read_errors", "status")

    def __init__(self, response: aiohttp.ClientResponse, decoder: Decoder | None) -> None:
        self._response = response
        self._decoder = decoder
        self.status = response.status
        self.read_errors = _READ_ERRORS
        # A plain body is read straight from aiohttp (it is most of the relay's calls).
        self.read_chunk = response.content.readany if decoder is None else self._read_mapped

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def _read_mapped(self) -> bytes:
        assert self._decoder is not None
        try:
            return await read_decoded(self._response.content.readany, self._decoder)
        except _UPSTREAM_ERRORS as exc:
            raise UpstreamBroken(describe(exc)) from exc

    def close(self) -> None:
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport:
    """One pooled aiohttp session for the app's lifetime (`async with transport:`)."""

    def __init__(
        self, *, connect_timeout_s: float, pool_idle_timeout_s: float, max_per_host: int
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._pool_idle_timeout_s = pool_idle_timeout_s
        self._max_per_host = max_per_host
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, float], aiohttp.ClientTimeout] = {}

    async def __aenter__(self) -> AiohttpTransport:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._max_per_host,
            # vLLM drops idle keep-alive connections after 5 s: ours are retired sooner.
            keepalive_timeout=self._pool_idle_timeout_s,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s),
            auto_decompress=False,  # decoded here, in bounded steps (Decoder)
            # No Accept-Encoding: vLLM answers in identity, and relayed bytes stay untouched.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        assert self._session is not None, "the transport is used outside its `async with`"
        timeout = self._timeouts.get((total_timeout_s, read_timeout_s))
        if timeout is None:  # a handful of distinct values: made once each
            timeout = aiohttp.ClientTimeout(
                total=total_timeout_s, sock_connect=None, sock_read=read_timeout_s
            )
            self._timeouts[(total_timeout_s, read_timeout_s)] = timeout
        try:
            response = await self._session.request(
                method, url, data=body, headers=headers, timeout=timeout
            )
        except _UPSTREAM_ERRORS as exc:
            raise UpstreamUnavailable(describe(exc)) from exc
        try:
            decoder = decoder_for(response.headers.get("content-encoding"))
        except UpstreamBroken:
            response.close()
            raise
        return AiohttpResponse(response, decoder)


# --- a working fake, for tests (as httpx's MockTransport) -----------------------------------
@dataclass(slots=True)
class MockResponse:
    """A scripted answer: its chunks are returned one per read; an exception among them is
    raised at that read (an upstream failing mid-body)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes | BaseException] = field(default_factory=list)
    closed: bool = False
    read_errors: tuple[type[BaseException], ...] = (UpstreamBroken,)
    _next: int = 0

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def read_chunk(self) -> bytes:
        if self._next >= len(self.chunks):
            return b""
        item = self.chunks[self._next]
        self._next += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True, slots=True)
class MockRequest:
    method: str
    url: str
    body: bytes | None
    headers: Mapping[str, str]


Handler = Callable[[MockRequest], Awaitable[MockResponse]]


class MockTransport:
    """Answers every request with `handler(request)`; an UpstreamUnavailable it raises is a
    failed connection. Records what was sent in `requests`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self.responses: list[MockResponse] = []

    async def __aenter__(self) -> MockTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

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
        request = MockRequest(method, url, body, dict(headers))
        self.requests.append(request)
        response = await self.handler(request)
        self.responses.append(response)
        return response


def sse_body(events: Iterable[bytes]) -> list[bytes | BaseException]:
    """Chunks for a MockResponse: each event framed as `data: ...\\n\\n`."""
    return [b"data: " + e + b"\n\n" for e in events]


async def read_all(response: UpstreamResponse, limit: int) -> bytes:
    """The whole (decoded) body, at most `limit` bytes; UpstreamBroken past it."""
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await response.read_chunk():
            size += len(chunk)
            if size > limit:
                raise UpstreamBroken(f"the backend's answer is larger than {limit} bytes")
            parts.append(chunk)
    except response.read_errors as exc:
        raise broken(exc) from exc
    return b"".join(parts)


def broken(exc: BaseException) -> UpstreamBroken:
    """`exc` (one of a response's `read_errors`) as UpstreamBroken."""
    if isinstance(exc, UpstreamBroken):
        return exc
    return UpstreamBroken(describe(exc))
