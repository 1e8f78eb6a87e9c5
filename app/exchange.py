"""One HTTP exchange on the raw ASGI interface: the request's headers read once, its body read
under a limit, the client's departure noticed at every stage, and the answer sent.

`async with call.watching():` runs a watcher beside the handler once the body is in: when the
client disconnects (while queued, while the backend prepares its answer, mid-stream) the handler
is cancelled where it waits, every `async with` inside it releases what it holds, and the block
ends with `ClientGone`. uvicorn does not cancel a handler whose client left; this does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from app.bodies import BodyBudget
from app.errors import ClientGone, KvrouteError, PayloadTooLarge
from app.validation import request_id_from

CUT_KEY = "kvroute.cut"  # in a request's ASGI scope, set by `app.listener` when it cuts one
# The status a cut request is recorded with: the listener's timeouts are 408s.
CUT_STATUS = {"PipelineTooDeep": 400}

Headers = list[tuple[bytes, bytes]]


def raw_headers(headers: Mapping[str, str]) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class Call:
    __slots__ = (
        "_receive",
        "_send",
        "finished",
        "gone",
        "headers",
        "held",
        "http10",
        "path",
        "peer",
        "request_id",
        "response_started",
        "scope",
        "send_raw",
        "started_s",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.started_s = clock()
        self.scope = scope
        self._receive = receive
        self._send = send
        self.send_raw = send  # for the relay's body chunks (`start`/`body` keep the state)
        # Header names arrive lower-cased (ASGI); a repeated header keeps its last value.
        self.headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        self.request_id = request_id_from(self.headers.get("x-request-id"))
        client = scope.get("client")
        self.peer: str | None = client[0] if client else None
        self.path: str = scope["path"]
        self.http10 = scope.get("http_version") == "1.0"
        self.response_started = False
        self.finished = False
        self.gone = False
        self.held = 0  # body bytes taken from the router's budget (`read_body`)

    @property
    def cut(self) -> str | None:
        """Why the listener cut this connection (`BodyTimeout`, `SendStalled`, `SendTooSlow`), if it did: a
        departure that was the router's timeout, not the client's choice."""
        kind = self.scope.get(CUT_KEY)
        return kind if isinstance(kind, str) else None

    # --- the request ---------------------------------------------------------------------
    async def read_body(self, limit: int, budget: BodyBudget) -> bytes:
        """The whole body, at most `limit` bytes (PayloadTooLarge past it, ClientGone when the
        client leaves during the upload), taken from `budget` as it arrives (BodiesFull when
        it is spent); `held` says how much, for whoever ends the request to give back."""
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                raise ClientGone("the client left while sending its request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            budget.take(len(chunk))
            self.held += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def watching(self) -> Watching:
        """`async with call.watching():` cancels the handler the moment the client disconnects;
        the block then raises ClientGone. Enter it only after the body was read (the watcher
        takes `receive`)."""
        return Watching(self)

    async def watch(self, main: asyncio.Task[Any]) -> None:
        message: Message = await self._receive()
        # After the last byte, `receive` reports a disconnect too: that one is not a departure.
        if message["type"] == "http.disconnect" and not self.finished:
            self.gone = True
            main.cancel()

    # --- the response --------------------------------------------------------------------
    async def start(self, status: int, headers: Headers) -> None:
        self.response_started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        if not more:
            self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        """A whole answer with its Content-Length."""
        raw = raw_headers(headers)
        raw.append((b"content-length", str(len(data)).encode()))
        await self.start(status, raw)
        await self.body(data, more=False)

    async def respond_error(self, exc: KvrouteError) -> None:
        headers = {"content-type": "application/json", **exc.headers()}
        headers["x-request-id"] = self.request_id
        await self.respond(exc.status, exc.body(), headers)


class Watching:
    """The watcher's lifetime: started on entry, cancelled on exit. (A class, not a generator:
    it is entered on every request.)"""

    __slots__ = ("_call", "_main", "_watcher")

    def __init__(self, call: Call) -> None:
        self._call = call

    async def __aenter__(self) -> None:
        main = asyncio.current_task()
        assert main is not None
        self._main = main
        self._watcher = asyncio.create_task(self._call.watch(main))

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._watcher.cancel()
        # Cancelled because the client left: that, and only that, becomes ClientGone (a
        # cancellation for another reason too, such as shutdown, is not ours to swallow).
        if exc_type is asyncio.CancelledError and self._call.gone and self._main.uncancel() == 0:
            raise ClientGone() from None
