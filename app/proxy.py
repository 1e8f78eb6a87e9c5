"""The upstream side: open a request on a vLLM backend, retry elsewhere before the first byte,
relay the answer, and close upstream the moment the client leaves.

Foreign exceptions (aiohttp, timeouts) become `UpstreamUnavailable` here, at one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.backends import BackendPool
from app.errors import KvrouteError, NoHealthyBackend, Overloaded, UpstreamUnavailable
from app.ownership import OwnershipStore
from app.routing import Decision, Ownership, Policy, RouteRequest, candidates_for
from app.stream_stats import DONE_EVENT, StreamScanner, render_error_event
from app.tracing import NO_TRACE, RequestTrace

log = logging.getLogger("kvroute.proxy")

# Statuses that mean "this backend cannot take it now": safe to retry on another one.
RETRYABLE_STATUSES = frozenset({502, 503})


def make_session(
    *, connect_timeout_s: float, pool_idle_timeout_s: float, max_per_host: int
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=max_per_host,
        keepalive_timeout=pool_idle_timeout_s,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


@dataclass(slots=True)
class Attempt:
    """An upstream response that answered with headers, and the decision that led to it."""

    decision: Decision
    response: aiohttp.ClientResponse
    retries: int


class Dispatcher:
    """Choose a backend, open the request there, and retry on another before the first byte."""

    def __init__(
        self,
        *,
        pool: BackendPool,
        policy: Policy,
        ownership: OwnershipStore,
        session: aiohttp.ClientSession,
        read_timeout_s: float,
        retries: int,
        retry_budget_s: float = 5.0,
        max_in_flight_per_backend: int = 0,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.ownership = ownership
        self.session = session
        self.read_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=None, sock_read=read_timeout_s
        )
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.max_in_flight_per_backend = max_in_flight_per_backend

    async def open(
        self,
        route: RouteRequest,
        ownership: Ownership,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        request_id: str,
        start_s: float,
        policy: Policy | None = None,
        remember: bool = True,
        trace: RequestTrace = NO_TRACE,
    ) -> Attempt:
        """Returns an attempt holding one in-flight slot on its backend; the caller releases it.

        A retry goes to another backend, and only while the request is younger than the retry
        budget: a slow failover would break the time-to-first-token objective anyway."""
        tried: list[str] = []
        last_error: KvrouteError | None = None
        for attempt in range(self.retries + 1):
            if attempt and time.monotonic() - start_s > self.retry_budget_s:
                break
            snapshot = self.pool.snapshot()
            candidates = candidates_for(
                snapshot, route.model, frozenset(tried), self.max_in_flight_per_backend
            )
            if not candidates:
                if not tried and candidates_for(snapshot, route.model):
                    raise Overloaded("every backend serving this model is at its in-flight limit")
                break
            decision = (policy or self.policy).choose(route, candidates, ownership)
            backend = self.pool.get(decision.backend)
            tried.append(backend.name)
            self.pool.acquire(backend.name)
            if remember:
                # Recorded at dispatch, not at the answer, so that requests arriving meanwhile
                # (the next conversations on the same system prompt) already see this home.
                await self.ownership.record(
                    route.keys,
                    backend.name,
                    route.prompt_tokens,
                    claim=ownership.owner is None and attempt == 0,
                )
            # vLLM wants ids unique among its in-flight requests: a retry gets a fresh one.
            attempt_headers = {
                **headers,
                "X-Request-Id": f"{request_id}-r{attempt}" if attempt else request_id,
            }
            # With tracing on: this attempt's span, its context sent as `traceparent`.
            trace.upstream(backend.name, attempt, attempt_headers)
            try:
                response = await self.session.post(
                    backend.url + path,
                    data=body,
                    headers=attempt_headers,
                    timeout=self.read_timeout,
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.pool.release(backend.name)
                reason = f"{type(exc).__name__}: {exc}"
                self.pool.mark_failed(backend.name, reason)
                last_error = UpstreamUnavailable(
                    f"backend {backend.name} is unreachable ({reason})", backend=backend.name
                )
                log.warning("attempt %d on %s failed: %s", attempt + 1, backend.name, reason)
                continue
            if response.status in RETRYABLE_STATUSES:
                self.pool.record_failure(backend.name, f"answered {response.status}")
                if attempt < self.retries and time.monotonic() - start_s <= self.retry_budget_s:
                    await response.read()
                    response.release()
                    self.pool.release(backend.name)
                    last_error = UpstreamUnavailable(
                        f"backend {backend.name} answered {response.status}", backend=backend.name
                    )
                    log.warning(
                        "attempt %d on %s answered %d", attempt + 1, backend.name, response.status
                    )
                    continue
            else:
                self.pool.record_success(backend.name)
            return Attempt(decision=decision, response=response, retries=len(tried) - 1)
        if last_error is not None:
            raise last_error
        raise NoHealthyBackend(f"no healthy backend serves model {route.model!r}")


def raw_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class RelayResponse(Response):
    """ASGI response that relays an upstream SSE stream through a `StreamScanner`.

    `finish(scanner, aborted, error)` renders the closing bytes (stats event, `[DONE]`) and records
    metrics; it runs on every path. A client disconnect cancels the relay, which closes upstream,
    so vLLM aborts the request and frees its slot.
    """

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        scanner: StreamScanner,
        headers: Mapping[str, str],
        finish: Callable[[StreamScanner, bool, str | None], Awaitable[bytes]],
    ) -> None:
        self.upstream = upstream
        self.scanner = scanner
        self.status_code = 200
        self.raw_headers = raw_headers(headers)
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        main = asyncio.current_task()
        assert main is not None
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    main.cancel()
                    return

        watcher = asyncio.create_task(watch())
        error: str | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            scanner = self.scanner
            # readany() hands over everything buffered in one piece; b"" is the end. (iter_any()
            # is the same wrapped in an async iterator, one more frame per chunk.)
            read = self.upstream.content.readany
            while chunk := await read():
                out = scanner.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            out = scanner.flush()
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if not scanner.done:
                error = "upstream stream ended before [DONE]"
        except asyncio.CancelledError:
            if not disconnected:
                raise
            main.uncancel()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"upstream failed mid-stream: {type(exc).__name__}: {exc}"
        finally:
            watcher.cancel()
            self.upstream.close()
        tail = await self.finish(self.scanner, disconnected, error)
        if disconnected:
            return
        if error is not None:
            log.warning("%s", error)
            # A chunk the scanner still holds goes out before the error event.
            tail = self.scanner.flush() + render_error_event(error) + tail
        with contextlib.suppress(OSError):
            await send(
                {"type": "http.response.body", "body": tail + DONE_EVENT, "more_body": False}
            )


class BytesResponse(Response):
    """A response of prepared bytes; skips Starlette's header rendering on the hot path."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.status_code = status
        self.body = body
        self.raw_headers = raw_headers(headers)
        self.raw_headers.append((b"content-length", str(len(body)).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body})
