"""The simulator's HTTP face: a plain ASGI app with vLLM's OpenAI routes and test controls.

vLLM routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /health`, `GET /version`, `GET /metrics`, `POST /reset_prefix_cache`, and the Responses API
(`POST /v1/responses`, `GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`) with vLLM's
in-memory store (`app.simulator.responses`; off with `responses_store=False`, as vLLM without
`VLLM_ENABLE_RESPONSES_API_STORE=1`). With an api_key,
paths under `/v1` need `Authorization: Bearer KEY` (401 `{"error": "Unauthorized"}`, as vLLM).
Unknown paths get FastAPI's `{"detail": "Not Found"}`.

Test controls (never in vLLM):
- `GET /sim/stats`: counters, running/waiting, cache totals and a log of the last requests with
  their cached_tokens, outcome and the forwarded headers (authorization, x-request-id,
  traceparent, tracestate, any other `x-*`).
- `GET /sim/control`: the failure modes now set.
- `POST /sim/control` with a JSON object of any of these keys; answers the new control state.
  Reset and restart apply first.
    `{"healthy": false}`             /health answers 503 (true: 200 again)
    `{"fail_next": N, "status": S}`  next N generation requests get status S (503 when not
                                     given) and a vLLM error body, before any byte
    `{"fail_mid_stream_after": K}`   next stream is cut (connection closed, no [DONE]) after K
                                     content chunks
    `{"error_mid_stream_after": K}`  next stream sends vLLM's mid-stream error event and
                                     `data: [DONE]` after K content chunks
    `{"delay_s": x}`                 extra delay before the first byte of every generation
                                     response, until set back to 0
    `{"restart": true}`              empty KV cache and Responses store, zero counters and log, later
                                     process_start_time_seconds (a restarted vLLM)
    `{"reset": true}`                controls back to defaults, empty KV cache, zero counters
                                     and log; same start time

A client that goes away (mid-stream or before the first token) aborts its request at once:
slot and KV blocks are freed and `aborted` counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from app.simulator.config import SimConfig
from app.simulator.engine import Engine, Generation, RequestRecord
from app.simulator.exposition import render_metrics
from app.simulator.protocol import (
    DONE_EVENT,
    Endpoint,
    SimError,
    SimRequest,
    completion_body,
    content_chunk,
    models_body,
    parse_json_object,
    parse_request,
    role_chunk,
    sse_event,
    usage,
    usage_chunk,
)
from app.simulator.responses import (
    EventCounter,
    ResponsesCall,
    ResponseStore,
    Stored,
    message_id,
    output_item,
    parse_responses,
    response_body,
    responses_usage,
)

VLLM_VERSION = "0.32.0"
_RECORDED_HEADERS = frozenset({"authorization", "traceparent", "tracestate"})
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
_METRICS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(slots=True)
class Controls:
    """Failure modes set through POST /sim/control."""

    healthy: bool = True
    fail_next: int = 0
    status: int = 503
    fail_mid_stream_after: int | None = None
    error_mid_stream_after: int | None = None
    delay_s: float = 0.0


async def _send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await _send_bytes(send, status, orjson.dumps(payload), _JSON)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client left first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _recorded(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in _RECORDED_HEADERS or k.startswith("x-")}


class SimulatorApp:
    """ASGI app; every piece of state of one simulated server lives here."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.controls = Controls()
        self.start_time_s = time.time()
        self._created = int(self.start_time_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.responses = ResponseStore(enabled=config.responses_store)
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/responses": {"POST": self._responses_create},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/version": {"GET": self._version},
            "/metrics": {"GET": self._metrics},
            "/reset_prefix_cache": {"POST": self._reset_prefix_cache},
            "/sim/stats": {"GET": self._stats},
            "/sim/control": {"GET": self._get_control, "POST": self._post_control},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if (
            self.config.api_key is not None
            and path.startswith("/v1")
            and method != "OPTIONS"
            and not self._authorized(scope)
        ):
            if path in ("/v1/chat/completions", "/v1/completions"):
                endpoint = "chat" if path == "/v1/chat/completions" else "completions"
                record = self.engine.new_record(endpoint, _recorded(_headers(scope)))
                record.status, record.outcome = 401, "unauthorized"
            await _send_json(send, 401, {"error": "Unauthorized"})
            return
        methods = self._routes.get(path) or self._response_routes(path)
        if methods is None:
            await _send_json(send, 404, {"detail": "Not Found"})
            return
        handler = methods.get(method)
        if handler is None:
            await _send_json(send, 405, {"detail": "Method Not Allowed"})
            return
        await handler(scope, receive, send)

    def abort_all(self) -> None:
        """Cut every in-flight generation (server shutdown); their clients see a dropped connection."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()

    # --- plumbing --------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.abort_all()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = bytes(value).decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    token.encode(), (self.config.api_key or "").encode()
                )
        return False

    # --- vLLM routes -------------------------------------------------------------------------
    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate("chat", scope, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate("completions", scope, receive, send)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, models_body(self.config, self._created))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_bytes(send, 200 if self.controls.healthy else 503, b"", [])

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"version": VLLM_VERSION, "simulator": True})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        snapshot = self.engine.metrics_snapshot(self.start_time_s)
        text = render_metrics(snapshot, self.config.served_models[0])
        await _send_bytes(send, 200, text.encode(), _METRICS)

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.engine.cache.reset()
        await _send_bytes(send, 200, b"", [])

    # --- Responses API ---------------------------------------------------------------------
    def _response_routes(self, path: str) -> dict[str, Handler] | None:
        """`/v1/responses/{id}` (GET) and `/v1/responses/{id}/cancel` (POST)."""
        rest = path.removeprefix("/v1/responses/")
        if rest == path or not rest:
            return None
        response_id, _, tail = rest.partition("/")
        if tail == "cancel":
            return {"POST": self._stored_answer(response_id, cancel=True)}
        if not tail:
            return {"GET": self._stored_answer(response_id, cancel=False)}
        return None

    def _stored_answer(self, response_id: str, *, cancel: bool) -> Handler:
        async def handler(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                if cancel:
                    body = self.responses.cancel(response_id)
                else:
                    body = self.responses.get(response_id).body
            except SimError as exc:
                await _send_json(send, exc.status, exc.body())
                return
            await _send_json(send, 200, body)

        return handler

    async def _responses_create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        headers = _headers(scope)
        record = self.engine.new_record("responses", _recorded(headers))
        try:
            call = parse_responses(body, headers, self.config, self.responses)
        except SimError as exc:
            record.status, record.outcome = exc.status, "rejected"
            self.engine.counters.rejected += 1
            await _send_json(send, exc.status, exc.body())
            return
        request = call.request
        record.id, record.model, record.stream = request.id, request.model, request.stream
        record.cache_salt, record.max_tokens = request.cache_salt, request.max_tokens
        await self._watched(lambda out: self._answer_response(call, record, out), receive, send)

    async def _answer_response(
        self, call: ResponsesCall, record: RequestRecord, send: Send
    ) -> None:
        if not await self._before_answer(record, send):
            return
        request = call.request
        item_id = message_id()
        if request.stream:
            await self._stream_response(call, record, item_id, send)
            return
        async with self.engine.session(request, record) as generation:
            text = await generation.run_to_end()
            generation.finish()
            final = self._finished(call, generation, item_id, text)
        await _send_json(send, 200, final)

    def _finished(
        self, call: ResponsesCall, generation: Generation, item_id: str, text: str
    ) -> dict[str, Any]:
        """The final body: `incomplete` when it stopped at the client's max_output_tokens, else
        `completed` (the simulated model ended its answer); stored when asked and the store is on."""
        info = responses_usage(
            len(call.request.prompt_tokens),
            generation.emitted,
            generation.cached_tokens,
            generation.created_tokens,
        )
        status = "incomplete" if call.limit_given else "completed"
        final = response_body(call, status=status, output=[output_item(item_id, text)], usage=info)
        if call.store:
            self.responses.items[call.request.id] = Stored(final, call.messages)
        return final

    async def _stream_response(
        self, call: ResponsesCall, record: RequestRecord, item_id: str, send: Send
    ) -> None:
        events = EventCounter()
        in_progress = response_body(call, status="in_progress", output=[], usage=None)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await _body(send, events.opening(in_progress, item_id))
        pieces: list[str] = []
        async with (
            self.engine.session(call.request, record) as generation,
            contextlib.aclosing(generation.tokens()) as tokens,
        ):
            async for fragment in tokens:
                pieces.append(fragment)
                await _body(send, events.delta(item_id, fragment))
            generation.finish()
            text = "".join(pieces)
            final = self._finished(call, generation, item_id, text)
        await _body(send, events.closing(item_id, text, final), more=False)

    # --- generation --------------------------------------------------------------------------
    async def _generate(
        self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send
    ) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        headers = _headers(scope)
        record = self.engine.new_record(endpoint, _recorded(headers))
        try:
            request = parse_request(endpoint, body, headers, self.config)
        except SimError as exc:
            record.status, record.outcome = exc.status, "rejected"
            self.engine.counters.rejected += 1
            await _send_json(send, exc.status, exc.body())
            return
        record.id, record.model, record.stream = request.id, request.model, request.stream
        record.cache_salt, record.max_tokens = request.cache_salt, request.max_tokens

        await self._watched(lambda out: self._respond(request, record, out), receive, send)

    async def _watched(
        self, respond: Callable[[Send], Awaitable[None]], receive: Receive, send: Send
    ) -> None:
        """Run `respond` in a child task and watch for the client leaving: vLLM aborts on
        disconnect."""
        started = False

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        task = asyncio.ensure_future(respond(tracked_send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        self._tasks.add(task)
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._tasks.discard(task)
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled() and self._stopping and not started:
            # Shut down before answering: vLLM's dead engine answers 503 (EngineDeadError), where
            # a bare return would make uvicorn invent a 500.
            dead = SimError(
                503,
                "EngineCore encountered an issue. See stack trace for the root cause.",
                type="EngineDeadError",
            )
            await _send_json(send, 503, dead.body())
            return
        if not task.cancelled():
            task.result()  # surfaces a bug as uvicorn's "Exception in ASGI application"

    async def _before_answer(self, record: RequestRecord, send: Send) -> bool:
        """The controls that act before any byte: a set failure (answered here, False) and the
        extra delay. True: go on and answer."""
        controls = self.controls
        failure: SimError | None = None
        if controls.fail_next > 0:
            controls.fail_next -= 1
            failure = SimError(
                controls.status,
                f"Simulated failure (status {controls.status}) set by /sim/control.",
            )
        if controls.delay_s > 0:
            try:
                await asyncio.sleep(controls.delay_s)
            except asyncio.CancelledError:
                record.outcome = "aborted"
                self.engine.counters.aborted += 1
                raise
        if failure is not None:
            record.status, record.outcome = failure.status, "failed"
            self.engine.counters.failed += 1
            await _send_json(send, failure.status, failure.body())
            return False
        return True

    async def _respond(self, request: SimRequest, record: RequestRecord, send: Send) -> None:
        controls = self.controls
        drop_after = error_after = None
        if request.stream and controls.fail_next == 0:
            drop_after, controls.fail_mid_stream_after = controls.fail_mid_stream_after, None
            error_after, controls.error_mid_stream_after = controls.error_mid_stream_after, None
        if not await self._before_answer(record, send):
            return
        if request.stream:
            await self._stream(request, record, send, drop_after, error_after)
            return
        async with self.engine.session(request, record) as generation:
            text = await generation.run_to_end()
            generation.finish()
            info = usage(
                request,
                generation.emitted,
                generation.cached_tokens,
                generation.created_tokens,
                self.config,
            )
        await _send_json(send, 200, completion_body(request, text, info))

    async def _stream(
        self,
        request: SimRequest,
        record: RequestRecord,
        send: Send,
        drop_after: int | None,
        error_after: int | None,
    ) -> None:
        # Headers go out at once, as vLLM's StreamingResponse does; events follow the tokens.
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        async with (
            self.engine.session(request, record) as generation,
            contextlib.aclosing(generation.tokens()) as tokens,
        ):
            sent = 0
            async for fragment in tokens:
                if drop_after is not None and sent >= drop_after:
                    generation.drop()
                    return  # response left incomplete: uvicorn closes the connection
                if error_after is not None and sent >= error_after:
                    generation.drop()
                    error = SimError(500, "Simulated mid-stream failure set by /sim/control.")
                    await _body(send, sse_event(error.body()) + DONE_EVENT, more=False)
                    return
                last = generation.emitted == request.max_tokens
                event = sse_event(content_chunk(request, fragment, "length" if last else None))
                if sent == 0 and request.endpoint == "chat":
                    event = sse_event(role_chunk(request)) + event
                await _body(send, event)
                sent += 1
            generation.finish()
            tail = DONE_EVENT
            if request.include_usage:
                info = usage(
                    request,
                    generation.emitted,
                    generation.cached_tokens,
                    generation.created_tokens,
                    self.config,
                )
                tail = sse_event(usage_chunk(request, info)) + tail
        await _body(send, tail, more=False)

    # --- test controls -----------------------------------------------------------------------
    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.engine.stats()
        stats["healthy"] = self.controls.healthy
        stats["start_time_s"] = self.start_time_s
        await _send_json(send, 200, stats)

    async def _get_control(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self._control_state())

    async def _post_control(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            self._apply_control(parse_json_object(body or b"{}"))
        except SimError as exc:
            await _send_json(send, exc.status, exc.body())
            return
        await _send_json(send, 200, self._control_state())

    def _control_state(self) -> dict[str, Any]:
        return {"controls": asdict(self.controls), "start_time_s": self.start_time_s}

    def _apply_control(self, data: dict[str, Any]) -> None:
        checks: dict[str, Callable[[Any], bool]] = {
            "healthy": lambda v: isinstance(v, bool),
            "fail_next": lambda v: _is_int(v) and v >= 0,
            "status": lambda v: _is_int(v) and 400 <= v <= 599,
            "fail_mid_stream_after": lambda v: v is None or (_is_int(v) and v >= 0),
            "error_mid_stream_after": lambda v: v is None or (_is_int(v) and v >= 0),
            "delay_s": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
            "restart": lambda v: isinstance(v, bool),
            "reset": lambda v: isinstance(v, bool),
        }
        for key, value in data.items():
            check = checks.get(key)
            if check is None:
                raise SimError(
                    400, f"Unknown control {key!r}; known: {', '.join(checks)}.", param=key
                )
            if not check(value):
                raise SimError(400, f"Bad value for control {key!r}: {value!r}.", param=key)
        if data.get("reset"):
            self.controls = Controls()
            self.engine.clear()
            self.responses.items.clear()
        if data.get("restart"):
            self.engine.clear()
            self.responses.items.clear()  # vLLM's store lives in its memory
            # Strictly later, so a router comparing start times always sees the restart.
            self.start_time_s = max(time.time(), self.start_time_s + 0.01)
            self._created = int(self.start_time_s)
        if "fail_next" in data and "status" not in data:
            self.controls.status = 503
        for key in (
            "healthy",
            "fail_next",
            "status",
            "fail_mid_stream_after",
            "error_mid_stream_after",
        ):
            if key in data:
                setattr(self.controls, key, data[key])
        if "delay_s" in data:
            self.controls.delay_s = float(data["delay_s"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def _body(send: Send, data: bytes, *, more: bool = True) -> None:
    message: Message = {"type": "http.response.body", "body": data, "more_body": more}
    await send(message)


def create_app(config: SimConfig) -> SimulatorApp:
    """A fresh simulated vLLM server (an ASGI app); no state is shared between apps."""
    return SimulatorApp(config)
