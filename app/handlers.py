"""The request path, step by step (see STYLE.md, "One request, end to end").

    handle      one record per request, whatever happens; our errors rendered OpenAI-style
    prepare     key, body, checks, model, tenant, prefix keys, the upstream body   (pure-ish)
    generate    rates -> admission slot -> ownership -> dispatch -> answer, each an `async with`
    answer_*    a whole answer, or a stream relayed with its stats chunk before `[DONE]`
    passthrough the other vLLM endpoints: keys, rates and admission too, least-loaded

Every resource is held by one `async with` in `generate`/`passthrough`; a client that leaves
cancels the handler where it waits (`Call.watching`), and each block releases on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.admission import Slot
from app.errors import BadRequest, ClientGone, KvrouteError, ModelNotFound, NoHealthyBackend
from app.exchange import CUT_STATUS, Call, raw_headers
from app.metrics import RequestRecord, RequestScope
from app.prefix import PrefixKeys, chat_keys, completion_keys, effective_tenant
from app.relay import SSE_HEADERS, Sink, relay_raw, relay_stream
from app.routing import NO_OWNERSHIP, Ownership, RouteRequest
from app.security import tenant_salt
from app.services import Services
from app.stream_stats import (
    DONE_EVENT,
    StreamFigures,
    StreamScanner,
    figures,
    render_error_event,
    render_stats_event,
    reported_cached,
    stats_format,
    usage_figures,
)
from app.tenancy import tenant_from
from app.tracing import NO_TRACE
from app.transport import read_all
from app.upstream import Attempt, Outgoing
from app.validation import Kind, check_fields, dump_body, parse_json_object

log = logging.getLogger("kvroute.api")

GENERATION_PATHS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
}
# OpenAI endpoints vLLM serves that the router forwards untouched (least-loaded, no affinity).
PASSTHROUGH_PATHS = (
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
)

Work = Callable[[Services, Call, RequestRecord], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed every check, ready for admission and dispatch."""

    kind: Kind
    model: str
    tenant: str
    route: RouteRequest
    out: Outgoing
    stream: bool
    client_wants_usage: bool
    tokens: int  # charged to the tenant's tokens-per-minute budget


# --- one record per request ------------------------------------------------------------------
async def handle(svc: Services, call: Call, endpoint: str, work: Work) -> None:
    trace = svc.tracing.start("POST", call.path, call.headers)
    rec = RequestRecord(
        endpoint=endpoint, status=0, scope=RequestScope(call.request_id, call.started_s, trace)
    )
    try:
        await work(svc, call, rec)
    except ClientGone:
        if call.cut is None:
            rec.status, rec.error_kind = 499, "ClientGone"
            svc.metrics.client_disconnects += 1
        else:  # the listener cut a client too slow to send or to read, or a hostile one
            rec.status, rec.error_kind = CUT_STATUS.get(call.cut, 408), call.cut
    except KvrouteError as exc:
        rec.status, rec.error_kind = exc.status, type(exc).__name__
        if not call.response_started:
            await call.respond_error(exc)
    except asyncio.CancelledError:
        rec.status, rec.error_kind = 499, "Cancelled"  # shutdown past its grace period
        raise
    except Exception:  # the request's outer boundary: a bug is a logged 500, never a traceback
        log.exception("unexpected error on %s", call.path)
        rec.status, rec.error_kind = 500, "InternalError"
        if not call.response_started:
            await call.respond_error(KvrouteError("internal router error; see the router log"))
    finally:
        svc.bodies.give(call.held)
        call.held = 0
        svc.metrics.record(rec)


# --- generation --------------------------------------------------------------------------
def generation(kind: Kind) -> Work:
    async def work(svc: Services, call: Call, rec: RequestRecord) -> None:
        await generate(svc, call, kind, rec)

    return work


async def generate(svc: Services, call: Call, kind: Kind, rec: RequestRecord) -> None:
    scope = _scope(rec)
    trace = scope.trace or NO_TRACE
    trace.phase("admission")
    req = await prepare(svc, call, kind, scope)
    async with (
        call.watching(),
        charged(svc, req.tenant, req.tokens, rec),
        svc.admission.slot(req.tenant, svc.ready_for(req.model)) as slot,
    ):
        trace.phase("selection")
        ownership = await lookup(svc, req.route)
        async with svc.dispatcher.open(req.route, ownership, req.out, trace=trace) as attempt:
            _note_attempt(rec, attempt)
            if req.stream and attempt.response.status == 200:
                await answer_stream(svc, call, req, attempt, slot, rec)
            else:
                await answer_whole(svc, call, req, attempt, rec)


@contextlib.asynccontextmanager
async def charged(
    svc: Services, tenant: str, tokens: int, rec: RequestRecord
) -> AsyncIterator[None]:
    """The tenant's rates, charged for this request (`tokens` up front: its most); when it ends,
    however it ends, what it did not use goes back to the tenant's TPM budget."""
    if not svc.rates.enabled:
        yield
        return
    await svc.rates.check(tenant, tokens)
    try:
        yield
    finally:
        svc.rates.refund(tenant, tokens - tokens_used(rec, tokens))


def tokens_used(rec: RequestRecord, charged: int) -> int:
    """What a request used of its charge: vLLM's usage (a stream cut short: the router's
    estimate) once a backend answered; nothing when none was reached or it answered an error;
    the whole charge when it cannot be known (a client gone before its whole answer came)."""
    if rec.prompt_tokens or rec.completion_tokens:
        return rec.prompt_tokens + rec.completion_tokens
    if rec.backend is None or rec.status not in (0, 200):
        return 0
    return charged


async def prepare(svc: Services, call: Call, kind: Kind, scope: RequestScope) -> Prepared:
    s = svc.settings
    bound = svc.keyring.authenticate(call.headers.get("authorization"))
    raw = await call.read_body(s.max_body_bytes, svc.bodies)
    body = parse_json_object(raw)
    check_fields(body, kind, s.max_messages, s.max_tokens_cap)
    model_given = bool(body.get("model"))
    model, context = resolve_model(svc, body)
    scope.model = model
    tenant = scope.tenant = bound or tenant_of(svc, call)
    route = route_for(svc, kind, tenant, model, body)
    stream = body.get("stream") is True
    options = body.get("stream_options") or {}
    wants_usage = stream and options.get("include_usage") is True
    rewrite = not model_given
    body["model"] = model
    if s.tenant_cache_salt:
        body["cache_salt"] = tenant_salt(s.cache_salt_secret, tenant)
        rewrite = True
    if stream and not wants_usage:
        # The router reads vLLM's exact token counts from the usage chunk, then hides it.
        body["stream_options"] = {**options, "include_usage": True}
        rewrite = True
    if s.max_tokens_cap and kind == "chat" and _limit_of(body) is None:
        body["max_tokens"] = capped_limit(s.max_tokens_cap, context)
        rewrite = True
    return Prepared(
        kind=kind,
        model=model,
        tenant=tenant,
        route=route,
        out=Outgoing(
            path=call.path,
            body=dump_body(body) if rewrite else raw,
            headers=upstream_headers(svc, call, "application/json"),
            request_id=call.request_id,
            started_s=call.started_s,
        ),
        stream=stream,
        client_wants_usage=wants_usage,
        tokens=_tpm_charge(kind, body, route.prompt_tokens, context) if svc.rates.enabled else 0,
    )


def capped_limit(cap: int, context: int | None) -> int:
    """The limit sent for a request that names none while MAX_TOKENS_CAP is set: vLLM would
    generate up to the rest of the context. vLLM clamps a limit to what the prompt leaves, but
    refuses one past max_model_len (`context`) itself, so the cap is held to that."""
    return min(cap, context) if context else cap


def _limit_of(body: Mapping[str, Any]) -> int | None:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) else None


def _tpm_charge(
    kind: Kind, body: Mapping[str, Any], prompt_tokens: int, context: int | None
) -> int:
    limit = _limit_of(body)
    if limit is None and kind == "completions":
        limit = 16  # vLLM's default for completions (chat's is the rest of the context)
    n = body.get("n")
    choices = n if isinstance(n, int) else 1
    return prompt_tokens + allowance(limit, prompt_tokens, context) * choices


def allowance(limit: int | None, prompt_tokens: int, context: int | None) -> int:
    """The most tokens one choice may generate, charged to the tenant's TPM up front (as
    OpenAI's limits charge max_tokens): its limit, or without one what vLLM allows, the rest
    of the model's context (`context`: the smallest max_model_len its backends report)."""
    if limit is not None:
        return limit
    return max((context or 0) - prompt_tokens, 0)


async def answer_whole(
    svc: Services, call: Call, req: Prepared, attempt: Attempt, rec: RequestRecord
) -> None:
    response = attempt.response
    data = await read_all(response, svc.settings.max_response_bytes)
    rec.status, rec.bytes_out = response.status, len(data)
    decision = attempt.decision
    if response.status == 200:
        rec.outcome, rec.affinity = decision.outcome, decision.affinity
        _note_retention(svc, attempt, _note_usage(rec, data))
        if rec.prompt_tokens:
            tokens = rec.prompt_tokens + rec.completion_tokens
            await svc.store.record(req.route.keys, decision.backend, tokens, claim=False)
    else:
        rec.error_kind = f"backend_{response.status}"
    headers = {
        "content-type": response.header("content-type") or "application/json",
        **_routing_headers(call, attempt),
    }
    await call.respond(response.status, data, headers)


async def answer_stream(
    svc: Services, call: Call, req: Prepared, attempt: Attempt, slot: Slot, rec: RequestRecord
) -> None:
    s = svc.settings
    scanner = StreamScanner(
        strip_usage=not req.client_wants_usage,
        start_s=call.started_s,
        max_event_bytes=s.max_sse_event_bytes,
    )
    sink = Sink(call, http10_limit=s.max_response_bytes)
    headers = raw_headers({**SSE_HEADERS, **_routing_headers(call, attempt)})
    error: str | None = None
    try:
        error = await relay_stream(sink, attempt.response, scanner, headers)
    finally:  # also when the client left mid-stream: the record keeps what was relayed
        fig = figures(
            scanner,
            estimated_prompt_tokens=req.route.prompt_tokens,
            estimated_cached_tokens=attempt.decision.cached_tokens,
        )
        _note_stream(rec, attempt, fig, scanner.bytes_in, error)
    tail = b""
    if error is None:
        _note_retention(svc, attempt, scanner.usage)
        tokens = fig.prompt_tokens + fig.completion_tokens
        await svc.store.record(req.route.keys, attempt.decision.backend, tokens, claim=False)
    else:
        log.warning("%s (request %s)", error, call.request_id)
        tail = scanner.abort() + render_error_event(error)
    form = stats_format(call.headers.get("x-router-stream-stats"), s)
    if form != "none":
        stats = stream_stats(
            attempt,
            slot,
            fig,
            prefix_key=req.route.keys.conversation,
            tenant=req.tenant,
            request_id=call.request_id,
            error=error,
        )
        default_object = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        tail += render_stats_event(scanner.meta, default_object, stats, form)
    await sink.finish(tail + DONE_EVENT)


# --- passthrough -----------------------------------------------------------------------------
async def passthrough(svc: Services, call: Call, rec: RequestRecord) -> None:
    s = svc.settings
    scope = _scope(rec)
    bound = svc.keyring.authenticate(call.headers.get("authorization"))
    raw = await call.read_body(s.max_body_bytes, svc.bodies)
    content_type = call.headers.get("content-type", "application/json")
    body = parse_json_object(raw) if content_type.startswith("application/json") else {}
    model, _ = resolve_model(svc, body)
    scope.model = model
    tenant = scope.tenant = bound or tenant_of(svc, call)
    keys = PrefixKeys(conversation=call.request_id, system="", prompt_chars=0, system_chars=0)
    route = RouteRequest(model=model, keys=keys, prompt_tokens=0, system_tokens=0)
    out = Outgoing(
        call.path, raw, upstream_headers(svc, call, content_type), call.request_id, call.started_s
    )
    async with call.watching():
        if svc.rates.enabled:
            await svc.rates.check(tenant, 0)
        async with (
            svc.admission.slot(tenant, svc.ready_for(model)),
            svc.dispatcher.open(
                route,
                NO_OWNERSHIP,
                out,
                policy=svc.passthrough_policy,
                remember=False,
                trace=scope.trace or NO_TRACE,
            ) as attempt,
        ):
            await answer_passthrough(svc, call, attempt, rec)


async def answer_passthrough(
    svc: Services, call: Call, attempt: Attempt, rec: RequestRecord
) -> None:
    response = attempt.response
    rec.backend, rec.status = attempt.decision.backend, response.status
    content_type = response.header("content-type") or "application/json"
    headers = {"content-type": content_type, **_routing_headers(call, attempt)}
    headers.pop("x-router-cache-outcome")
    if content_type.startswith("text/event-stream"):
        await relay_raw(
            Sink(call, http10_limit=svc.settings.max_response_bytes),
            response,
            raw_headers(headers),
        )
        return
    data = await read_all(response, svc.settings.max_response_bytes)
    rec.bytes_out = len(data)
    await call.respond(response.status, data, headers)


# --- the steps' parts ------------------------------------------------------------------------
def resolve_model(svc: Services, body: Mapping[str, Any]) -> tuple[str, int | None]:
    """The model a request names (or the only one served), and its context length as the
    backends report it (None until one does)."""
    model = body.get("model")
    served = svc.pool.models()
    if not model:
        model = svc.settings.served_model or (next(iter(served)) if len(served) == 1 else "")
        if not model:
            raise BadRequest("'model' is required", param="model")
    if model not in served:
        if not svc.pool.any_healthy():
            raise NoHealthyBackend("no backend is healthy; try again shortly")
        names = ", ".join(sorted(served)) or "none"
        raise ModelNotFound(
            f"The model `{model}` does not exist. Models served: {names}.", param="model"
        )
    return str(model), served[model]


def tenant_of(svc: Services, call: Call) -> str:
    return tenant_from(
        call.headers, call.peer, svc.trusted, headers_from_anyone=svc.settings.tenant_headers_open
    )


def route_for(
    svc: Services, kind: Kind, tenant: str, model: str, body: Mapping[str, Any]
) -> RouteRequest:
    keyed_tenant = effective_tenant(tenant, body.get("cache_salt"))
    window = svc.settings.prefix_window_chars
    keys = (
        chat_keys(keyed_tenant, model, body["messages"], window)
        if kind == "chat"
        else completion_keys(keyed_tenant, model, body["prompt"], window)
    )
    per_token = svc.settings.chars_per_token
    return RouteRequest(
        model=model,
        keys=keys,
        prompt_tokens=int(keys.prompt_chars / per_token) + 1,
        system_tokens=int(keys.system_chars / per_token),
    )


async def lookup(svc: Services, route: RouteRequest) -> Ownership:
    if not svc.settings.system_affinity:
        ownership = await svc.store.lookup(route.keys)
        if ownership.system_holders:
            return Ownership(owner=ownership.owner, owner_tokens=ownership.owner_tokens)
        return ownership
    if not svc.settings.first_home_claim:
        return await svc.store.lookup(route.keys)
    # Held to the dispatch that follows (no await between): a first home proposed in the
    # look-up counts until the request is counted where it goes.
    with svc.dispatcher.first_home(route) as first_home:
        return await svc.store.lookup(route.keys, first_home)


def upstream_headers(svc: Services, call: Call, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if svc.settings.backend_api_key:
        headers["Authorization"] = f"Bearer {svc.settings.backend_api_key}"
    elif "authorization" in call.headers and not svc.keyring.enabled:
        # Without router keys the client's key is meant for vLLM; with them it is ours.
        headers["Authorization"] = call.headers["authorization"]
    traceparent = call.headers.get("traceparent")
    if traceparent:
        headers["traceparent"] = traceparent
    return headers


def stream_stats(
    attempt: Attempt,
    slot: Slot,
    fig: StreamFigures,
    *,
    prefix_key: str,
    tenant: str,
    request_id: str,
    error: str | None,
) -> dict[str, Any]:
    """The figures of the `router.stream_stats` message (chat, completions and Responses)."""
    decision = attempt.decision
    stats: dict[str, Any] = {
        "backend": decision.backend,
        "cache_outcome": decision.outcome,
        "affinity": decision.affinity,
        "ttft_ms": fig.ttft_ms,
        "tps": fig.tps,
        "prompt_tokens": fig.prompt_tokens,
        "completion_tokens": fig.completion_tokens,
        "cached_tokens": fig.cached_tokens,
        "novel_tokens": fig.novel_tokens,
        "token_source": fig.token_source,
        "prefix_key": prefix_key,
        "tenant": tenant,
        "retries": attempt.retries,
        "queue_ms": round(slot.queue_ms, 3),
        "request_id": request_id,
    }
    if error:
        stats["error"] = error
    return stats


def _routing_headers(call: Call, attempt: Attempt) -> dict[str, str]:
    return {
        "x-request-id": call.request_id,
        "x-router-backend": attempt.decision.backend,
        "x-router-cache-outcome": attempt.decision.outcome,
    }


def _note_attempt(rec: RequestRecord, attempt: Attempt) -> None:
    rec.backend, rec.retries = attempt.decision.backend, attempt.retries


def _note_usage(rec: RequestRecord, data: bytes) -> dict[str, Any] | None:
    """The answer's usage, noted in the record (None when it has none)."""
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        usage = orjson.loads(data).get("usage")
        if isinstance(usage, dict):
            rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens = usage_figures(usage)
            return usage
    return None


def _note_retention(svc: Services, attempt: Attempt, usage: dict[str, Any] | None) -> None:
    """An answer to a conversation its backend owns tells how much of it the backend kept."""
    decision = attempt.decision
    if usage is None or not decision.owner_tokens:
        return
    prompt, _, _ = usage_figures(usage)
    expected = min(decision.owner_tokens, prompt)
    svc.pool.note_cached(decision.backend, expected, reported_cached(usage))


def _note_stream(
    rec: RequestRecord, attempt: Attempt, fig: StreamFigures, bytes_out: int, error: str | None
) -> None:
    rec.status, rec.stream, rec.bytes_out = 200, True, bytes_out
    rec.outcome, rec.affinity = attempt.decision.outcome, attempt.decision.affinity
    rec.ttft_ms, rec.tps = fig.ttft_ms, fig.tps
    rec.prompt_tokens, rec.completion_tokens = fig.prompt_tokens, fig.completion_tokens
    rec.cached_tokens = fig.cached_tokens
    if error is not None:
        rec.error_kind = "UpstreamBroken"


def _scope(rec: RequestRecord) -> RequestScope:
    assert rec.scope is not None
    return rec.scope
