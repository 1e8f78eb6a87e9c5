"""The Responses API's request path: `POST /v1/responses` (stream and not), and
`GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`, routed to the backend that holds the
response.

    create      a new conversation: prefix keys as chat (tenant, model, instructions, opening of
                `input`) and the sticky policy; a turn with `previous_response_id`: its owner only
    continue_   the owner is down, restarted, or answers that it no longer has the response:
                with RESPONSES_HISTORY, the turn goes elsewhere with the conversation's items
                inlined as `input` (outcome `reassigned`); without it, 410 `response_lost`
    stored      GET and cancel of a response: its owner only

The owner is recorded from the non-stream body's `id`, or from the stream's `response.created`
event before that event is relayed, so that the client's next turn (maybe through another router
replica) finds it. The same steps as chat: keys, rates, admission slot, dispatch, one record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import orjson

from app.admission import Slot
from app.candidates import Candidate
from app.errors import (
    BadRequest,
    NoHealthyBackend,
    Overloaded,
    ResponseLost,
    ResponseNotFound,
    UpstreamBroken,
    UpstreamUnavailable,
)
from app.exchange import Call, raw_headers
from app.handlers import (
    _note_attempt,
    _note_stream,
    _routing_headers,
    _scope,
    allowance,
    capped_limit,
    charged,
    lookup,
    resolve_model,
    stream_stats,
    tenant_of,
    upstream_headers,
)
from app.metrics import RequestRecord
from app.prefix import chat_keys, effective_tenant
from app.relay import SSE_HEADERS, Sink
from app.responses import Owner, history, input_items, keep_turn, output_items
from app.responses_stream import ResponsesScanner, render_error, render_stats, usage_tokens
from app.routing import NO_OWNERSHIP, Decision, Ownership, RouteRequest
from app.security import tenant_salt
from app.services import Services
from app.stream_stats import EventTooLarge, stats_format
from app.tracing import NO_TRACE
from app.transport import read_all
from app.upstream import Attempt, Outgoing
from app.validation import dump_body, parse_json_object

log = logging.getLogger("kvroute.responses")

PATH = "/v1/responses"
# Look-ups of unknown ids at once, router-wide: each is one GET to every backend, and comes
# before admission (the owner decides the model), so it needs its own bound.
MAX_DISCOVERIES = 16
MAX_ID_CHARS = 256  # vLLM's ids are `resp_` and 16 or 32 hex digits (or the caller's request_id)


class OwnerAway(Exception):
    """The owner of a previous response is not among the backends that can take the turn."""


class Lost(Exception):
    """The owner cannot continue the conversation: why, in words for the client."""


@dataclass(frozen=True, slots=True)
class Pinned:
    """A policy with one answer: the backend that holds the response."""

    url: str

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], ownership: Ownership
    ) -> Decision:
        for backend in candidates:
            if backend.url == self.url:
                return Decision(backend.name, "hit", "conversation", 0)
        raise OwnerAway(self.url)


@dataclass(frozen=True, slots=True)
class Turn:
    """A `POST /v1/responses` that passed its checks."""

    tenant: str
    model: str
    body: dict[str, Any]  # what goes upstream, before serialisation
    raw: bytes | None  # the client's bytes, when the body went unchanged
    route: RouteRequest
    previous: str | None  # previous_response_id as sent upstream
    chain_previous: str | None  # the turn before this one, for the kept history
    new_items: list[Any]  # this turn's own input items
    stream: bool
    store: bool
    tokens: int
    reassigned: bool = False

    def outgoing(self, svc: Services, call: Call) -> Outgoing:
        return Outgoing(
            path=PATH,
            body=self.raw if self.raw is not None else dump_body(self.body),
            headers=upstream_headers(svc, call, "application/json"),
            request_id=call.request_id,
            started_s=call.started_s,
        )


# --- POST /v1/responses ----------------------------------------------------------------------
async def create(svc: Services, call: Call, rec: RequestRecord) -> None:
    turn = await prepare(svc, call, rec)
    async with (
        call.watching(),
        charged(svc, turn.tenant, turn.tokens, rec),
        svc.admission.slot(turn.tenant, svc.ready_for(turn.model)) as slot,
    ):
        if turn.previous is None:
            ownership = await lookup(svc, turn.route)
            await send_turn(svc, call, turn, rec, slot, ownership, None)
            return
        owner = await owner_of(svc, call, turn.previous, turn.model)
        if owner is None:
            raise ResponseNotFound(
                f"Response with id '{turn.previous}' not found.",
                param="previous_response_id",
            )
        try:
            if owner.state == "lost":
                raise Lost("has restarted since it stored it")
            await send_turn(svc, call, turn, rec, slot, NO_OWNERSHIP, Pinned(owner.backend))
        except Lost as lost:
            await continue_elsewhere(svc, call, turn, rec, slot, str(lost))


async def prepare(svc: Services, call: Call, rec: RequestRecord) -> Turn:
    s = svc.settings
    scope = _scope(rec)
    bound = svc.keyring.authenticate(call.headers.get("authorization"))
    raw = await call.read_body(s.max_body_bytes, svc.bodies)
    body = parse_json_object(raw)
    check_turn(body, s.max_messages, s.max_tokens_cap)
    model_given = bool(body.get("model"))
    model, context = resolve_model(svc, body)
    scope.model = model
    tenant = scope.tenant = bound or tenant_of(svc, call)
    rewrite = not model_given
    body["model"] = model
    if s.tenant_cache_salt:
        body["cache_salt"] = tenant_salt(s.cache_salt_secret, tenant)
        rewrite = True
    if s.max_tokens_cap and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = capped_limit(s.max_tokens_cap, context)
        rewrite = True
    route = route_for(svc, tenant, model, body)
    previous = body.get("previous_response_id")
    limit = body.get("max_output_tokens")
    charge = 0  # what the tenant's TPM is charged up front
    if svc.rates.enabled:
        named = limit if isinstance(limit, int) else None
        charge = route.prompt_tokens + allowance(named, route.prompt_tokens, context)
    return Turn(
        tenant=tenant,
        model=model,
        body=body,
        raw=None if rewrite else raw,
        route=route,
        previous=previous,
        chain_previous=previous,
        new_items=input_items(body["input"]) if s.responses_history else [],
        stream=body.get("stream") is True,
        store=body.get("store") is not False,
        tokens=charge,
    )


def check_turn(body: Mapping[str, Any], max_messages: int, max_tokens_cap: int) -> None:
    """The fields the router reads; vLLM checks the rest."""
    value = body.get("input")
    if value is None:
        raise BadRequest("'input' is required", param="input")
    if not isinstance(value, str | list):
        raise BadRequest("'input' must be a string or an array of items", param="input")
    if isinstance(value, list) and len(value) > max_messages:
        raise BadRequest(
            f"'input' has {len(value)} items; the limit is {max_messages}", param="input"
        )
    for name, kind in (("previous_response_id", str), ("instructions", str), ("stream", bool)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise BadRequest(f"'{name}' must be a {kind.__name__}", param=name)
    limit = body.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest(
            "'max_output_tokens' must be an integer of at least 1", param="max_output_tokens"
        )
    if max_tokens_cap and isinstance(limit, int) and limit > max_tokens_cap:
        raise BadRequest(
            f"'max_output_tokens' is {limit}; this router allows at most {max_tokens_cap}",
            param="max_output_tokens",
        )


def route_for(svc: Services, tenant: str, model: str, body: Mapping[str, Any]) -> RouteRequest:
    """Keys as for chat: `instructions` as the system prompt, then the opening of `input`."""
    keyed_tenant = effective_tenant(tenant, body.get("cache_salt"))
    window = svc.settings.prefix_window_chars
    keys = chat_keys(keyed_tenant, model, keyed_messages(body), window)
    per_token = svc.settings.chars_per_token
    return RouteRequest(
        model=model,
        keys=keys,
        prompt_tokens=int(keys.prompt_chars / per_token) + 1,
        system_tokens=int(keys.system_chars / per_token),
    )


def keyed_messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """`instructions` and the items of `input` up to its first user message, as chat messages
    (the keys read no further; bounded work whatever the input's length)."""
    messages: list[Mapping[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    for item in input_items(body.get("input")):
        if not isinstance(item, Mapping):
            continue
        role = item.get("role", "user")
        messages.append({"role": role, "content": _as_chat_content(item.get("content"))})
        if role == "user":
            break
    return messages


def _as_chat_content(content: Any) -> Any:
    """Responses parts (`input_text`, `output_text`) read as chat text parts."""
    if not isinstance(content, list):
        return content
    return [
        {"type": "text", "text": part.get("text", "")}
        if isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text")
        else part
        for part in content
    ]


async def send_turn(
    svc: Services,
    call: Call,
    turn: Turn,
    rec: RequestRecord,
    slot: Slot,
    ownership: Ownership,
    pinned: Pinned | None,
) -> None:
    """Dispatch and answer; for a pinned turn, an owner that cannot take it raises `Lost`
    (before any byte went to the client)."""
    trace = _scope(rec).trace or NO_TRACE
    try:
        async with svc.dispatcher.open(
            turn.route,
            ownership,
            turn.outgoing(svc, call),
            policy=pinned or svc.policy,
            remember=pinned is None,
            trace=trace,
        ) as opened:
            attempt = _reassigned(opened) if turn.reassigned else opened
            _note_attempt(rec, attempt)
            if turn.stream and attempt.response.status == 200:
                await answer_stream(svc, call, turn, attempt, slot, rec)
            else:
                await answer_whole(svc, call, turn, attempt, rec, pinned=pinned is not None)
    except (OwnerAway, UpstreamUnavailable, NoHealthyBackend) as exc:
        if pinned is None or call.response_started:
            raise
        if _is_healthy(svc, pinned.url):
            _raise_busy(exc)
        raise Lost("is down or unreachable") from exc


def _raise_busy(exc: Exception) -> NoReturn:
    """The owner is up, but at its in-flight limit (429) or answering 503 (502 as for chat):
    the response is not lost; the client may retry."""
    if isinstance(exc, OwnerAway):
        raise Overloaded("the backend that holds this response is busy; retry shortly") from exc
    raise exc


def _reassigned(attempt: Attempt) -> Attempt:
    decision = dataclasses.replace(attempt.decision, outcome="reassigned")
    return dataclasses.replace(attempt, decision=decision)


async def continue_elsewhere(
    svc: Services, call: Call, turn: Turn, rec: RequestRecord, slot: Slot, why: str
) -> None:
    previous = turn.previous
    if not svc.settings.responses_history:
        raise ResponseLost(
            f"Response '{previous}' was kept by a vLLM server that {why}; vLLM keeps responses "
            "in memory only, so this conversation cannot be continued. Start a new one, or send "
            "the conversation as `input` (this router continues conversations itself when run "
            "with RESPONSES_HISTORY=true).",
            param="previous_response_id",
        )
    assert previous is not None
    items = await history(svc.responses, turn.tenant, previous)
    if items is None:
        raise ResponseLost(
            f"Response '{previous}' was kept by a vLLM server that {why}, and this router kept "
            "no history of that conversation (expired, over RESPONSES_HISTORY_MAX_BYTES, or "
            "pushed out of memory past RESPONSES_HISTORY_MEMORY_BYTES); "
            "it cannot be continued. Start a new one.",
            param="previous_response_id",
        )
    log.info("conversation of %s continued elsewhere: its backend %s", previous, why)
    body = {k: v for k, v in turn.body.items() if k != "previous_response_id"}
    body["input"] = items + input_items(turn.body["input"])
    rebuilt = dataclasses.replace(
        turn,
        body=body,
        raw=None,
        route=route_for(svc, turn.tenant, turn.model, body),
        previous=None,
        reassigned=True,
    )
    ownership = await lookup(svc, rebuilt.route)
    await send_turn(svc, call, rebuilt, rec, slot, ownership, None)


# --- answers ---------------------------------------------------------------------------------
async def answer_whole(
    svc: Services, call: Call, turn: Turn, attempt: Attempt, rec: RequestRecord, *, pinned: bool
) -> None:
    response = attempt.response
    data = await read_all(response, svc.settings.max_response_bytes)
    if pinned and _forgot(response.status, data):  # the owner restarted before we noticed
        raise Lost("no longer holds it (restarted)")
    rec.status, rec.bytes_out = response.status, len(data)
    decision = attempt.decision
    if response.status == 200:
        rec.outcome, rec.affinity = decision.outcome, decision.affinity
        body = _json_object(data)
        usage = body.get("usage")
        if isinstance(usage, dict):
            rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens = usage_tokens(usage)
        await record_response(svc, turn, attempt, body.get("id"), body)
    else:
        rec.error_kind = f"backend_{response.status}"
    headers = {
        "content-type": response.header("content-type") or "application/json",
        **_routing_headers(call, attempt),
    }
    await call.respond(response.status, data, headers)


async def answer_stream(
    svc: Services, call: Call, turn: Turn, attempt: Attempt, slot: Slot, rec: RequestRecord
) -> None:
    s = svc.settings
    scanner = ResponsesScanner(start_s=call.started_s, max_event_bytes=s.max_sse_event_bytes)
    sink = Sink(call, http10_limit=s.max_response_bytes)
    await sink.start(200, raw_headers({**SSE_HEADERS, **_routing_headers(call, attempt)}))
    error: str | None = None
    try:
        error = await relay(svc, turn, attempt, sink, scanner)
    finally:  # also when the client left mid-stream
        fig = scanner.figures(turn.route.prompt_tokens, attempt.decision.cached_tokens)
        _note_stream(rec, attempt, fig, scanner.bytes_in, error)
    tail = b""
    if error is None and scanner.final is not None:
        await record_response(
            svc, turn, attempt, scanner.response_id, scanner.final, remembered=True
        )
    elif error is not None:
        log.warning("%s (request %s)", error, call.request_id)
        tail = render_error(scanner.events, error)
    if stats_format(call.headers.get("x-router-stream-stats"), s) != "none":
        stats = stream_stats(
            attempt,
            slot,
            fig,
            prefix_key=turn.route.keys.conversation,
            tenant=turn.tenant,
            request_id=call.request_id,
            error=error,
        )
        tail += render_stats(scanner.events + (1 if error else 0), stats)
    await sink.finish(tail)


async def relay(
    svc: Services, turn: Turn, attempt: Attempt, sink: Sink, scanner: ResponsesScanner
) -> str | None:
    """Relay whole events; the owner is recorded before `response.created` goes out."""
    read = attempt.response.read_chunk
    remembered = not turn.store
    try:
        while chunk := await read():
            out = scanner.feed(chunk)
            if not remembered and scanner.response_id is not None:
                remembered = True
                await svc.responses.remember(scanner.response_id, _url(svc, attempt))
            if out:
                await sink.write(out)
        out = scanner.flush()
        if out:
            await sink.write(out)
    except UpstreamBroken as exc:
        return f"upstream failed mid-stream: {exc.message}"
    except EventTooLarge as exc:
        return str(exc)
    if scanner.error is not None:
        return None  # the backend's own error event was relayed
    return None if scanner.done else "upstream stream ended before response.completed"


async def record_response(
    svc: Services,
    turn: Turn,
    attempt: Attempt,
    response_id: object,
    body: Mapping[str, Any],
    *,
    remembered: bool = False,
) -> None:
    """The owner of a stored response; its turn in the history; the prefix owner's tokens."""
    if not isinstance(response_id, str) or not turn.store:
        return
    backend = attempt.decision.backend
    if not remembered:
        await svc.responses.remember(response_id, _url(svc, attempt))
    s = svc.settings
    if s.responses_history:
        items = turn.new_items + output_items(body)
        await keep_turn(
            svc.responses,
            turn.tenant,
            response_id,
            turn.chain_previous,
            items,
            s.responses_history_max_bytes,
        )
    usage = body.get("usage")
    if turn.previous is None and isinstance(usage, dict):
        prompt, completion, _ = usage_tokens(usage)
        await svc.store.record(turn.route.keys, backend, prompt + completion, claim=False)


# --- GET /v1/responses/{id}, POST /v1/responses/{id}/cancel -----------------------------------
async def stored(svc: Services, call: Call, rec: RequestRecord) -> None:
    response_id, method = stored_target(call)
    bound = svc.keyring.authenticate(call.headers.get("authorization"))
    if method == "POST":
        await call.read_body(svc.settings.max_body_bytes, svc.bodies)
    scope = _scope(rec)
    tenant = scope.tenant = bound or tenant_of(svc, call)
    async with call.watching():
        # The rate first: a look-up of an unknown id asks every backend (`discover`).
        if svc.rates.enabled:
            await svc.rates.check(tenant, 0)
        owner = await owner_of(svc, call, response_id, None)
        if owner is None:
            raise ResponseNotFound(
                f"Response with id '{response_id}' not found.", param="response_id"
            )
        model = scope.model = _model_of(svc, owner.backend)
        if owner.state == "lost" or model is None:
            raise _lost(response_id, "has restarted since it stored it" if model else "is gone")
        keys = chat_keys(tenant, model, [], 0)
        route = RouteRequest(model=model, keys=keys, prompt_tokens=0, system_tokens=0)
        pinned = Pinned(owner.backend)
        async with svc.admission.slot(tenant, svc.ready_for(model)):
            try:
                out = _stored_out(svc, call, method)
                async with svc.dispatcher.open(
                    route, NO_OWNERSHIP, out, policy=pinned, remember=False
                ) as attempt:
                    await _answer_stored(svc, call, attempt, rec, response_id)
            except (OwnerAway, UpstreamUnavailable, NoHealthyBackend) as exc:
                if call.response_started:
                    raise
                if _is_healthy(svc, pinned.url):
                    _raise_busy(exc)
                raise _lost(response_id, "is down or unreachable") from exc


def _stored_out(svc: Services, call: Call, method: str) -> Outgoing:
    query = call.scope.get("query_string", b"")
    return Outgoing(
        path=call.path + ("?" + query.decode("latin-1") if query else ""),
        body=b"",
        headers=upstream_headers(svc, call, "application/json"),
        request_id=call.request_id,
        started_s=call.started_s,
        method=method,
    )


def stored_target(call: Call) -> tuple[str, str]:
    """(response id, method) of a stored-response route; 404 for any other path or method."""
    rest = call.path.removeprefix(PATH + "/")
    response_id, _, tail = rest.partition("/")
    method = call.scope.get("method", "GET")
    if response_id and (
        (tail == "" and method == "GET") or (tail == "cancel" and method == "POST")
    ):
        return response_id, method
    raise ResponseNotFound(f"{method} {call.path}: no such route", param=None, code="not_found")


async def _answer_stored(
    svc: Services, call: Call, attempt: Attempt, rec: RequestRecord, response_id: str
) -> None:
    response = attempt.response
    content_type = response.header("content-type") or "application/json"
    headers = {"content-type": content_type, **_routing_headers(call, attempt)}
    headers.pop("x-router-cache-outcome")
    if content_type.startswith("text/event-stream"):  # GET ?stream=true of a background one
        sink = Sink(call, http10_limit=svc.settings.max_response_bytes)
        await sink.start(response.status, raw_headers(headers))
        while chunk := await response.read_chunk():
            await sink.write(chunk)
        await sink.finish(b"")
        return
    data = await read_all(response, svc.settings.max_response_bytes)
    if _forgot(response.status, data):  # as for a turn: gone, not "never was"
        raise _lost(response_id, "no longer holds it (restarted)")
    rec.status, rec.bytes_out = response.status, len(data)
    await call.respond(response.status, data, headers)


async def owner_of(svc: Services, call: Call, response_id: str, model: str | None) -> Owner | None:
    """The owner record, else the backend that still holds the response (asked, see
    `discover`); an id longer than any vLLM makes is neither looked up nor stored as a key."""
    if len(response_id) > MAX_ID_CHARS:
        return None
    owner = await svc.responses.owner(response_id)
    if owner is not None:
        return owner
    if svc.discovering >= MAX_DISCOVERIES:  # each asks every backend: a bounded fan-out
        raise Overloaded(
            f"{MAX_DISCOVERIES} look-ups of response ids this router has no record of are "
            "running; retry shortly"
        )
    svc.discovering += 1
    try:
        headers = upstream_headers(svc, call, "application/json")
        url = await discover(svc, headers, response_id, model)
    finally:
        svc.discovering -= 1
    if url is None:
        return None
    await svc.responses.remember(response_id, url)
    return Owner(url, "live")


async def discover(
    svc: Services, headers: Mapping[str, str], response_id: str, model: str | None
) -> str | None:
    """Which healthy backend answers `GET /v1/responses/{id}` (vLLM answers from memory): the
    owner map is gone after a router restart without Redis, or after its TTL, while vLLM keeps
    every response. One short GET per backend, only for ids the router does not know."""
    timeout_s = svc.settings.probe_timeout_s
    path = f"{PATH}/{quote(response_id, safe='')}"

    async def holds(url: str) -> bool:
        try:
            response = await svc.transport.request(
                "GET", url + path, None, headers, read_timeout_s=timeout_s,
                total_timeout_s=timeout_s,
            )  # fmt: skip
        except UpstreamUnavailable:
            return False
        try:
            return response.status == 200
        finally:
            response.close()

    urls = [
        b.url for b in svc.pool.snapshot() if b.healthy and (model is None or model in b.models)
    ]
    found = await asyncio.gather(*(holds(url) for url in urls))
    return next((url for url, held in zip(urls, found, strict=True) if held), None)


def _forgot(status: int, data: bytes) -> bool:
    """vLLM's "Response with id ... not found." from a backend the router saw store it."""
    return status == 404 and b'"response_id"' in data


def _lost(response_id: str, why: str) -> ResponseLost:
    return ResponseLost(
        f"Response '{response_id}' was kept by a vLLM server that {why}; vLLM keeps responses "
        "in memory only, so it is gone.",
        param="response_id",
    )


# --- parts -----------------------------------------------------------------------------------
def _url(svc: Services, attempt: Attempt) -> str:
    return svc.pool.get(attempt.decision.backend).url


def _is_healthy(svc: Services, url: str) -> bool:
    backend = svc.pool.by_url(url)
    return backend is not None and backend.routable


def _model_of(svc: Services, url: str) -> str | None:
    """A model the backend at `url` serves (what admission and dispatch filter on)."""
    backend = svc.pool.by_url(url)
    return min(backend.models) if backend is not None and backend.models else None


def _json_object(data: bytes) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(data)
        if isinstance(body, dict):
            return body
    return {}
