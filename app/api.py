"""`create_app(settings)`: routes, lifespan and error handlers of the router.

The lifespan owns the upstream HTTP session, the backend probes and the ownership store; the
request path is: parse once -> tenant -> prefix keys -> ownership -> selection -> upstream ->
relay with stream stats -> metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import aiohttp
import orjson
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.admission import Admission, Limits, RateLimits, RedisRateLimits
from app.backends import BackendPool
from app.config import Settings, load_settings
from app.dashboard import SeriesRecorder, TenantTags, dashboard_data, page_headers, page_html
from app.errors import (
    BadRequest,
    KvrouteError,
    ModelNotFound,
    NoHealthyBackend,
    PayloadTooLarge,
    UpstreamBroken,
)
from app.logs import RequestLog, configure_logging
from app.metrics import RequestRecord, RequestScope, RouterMetrics
from app.ownership import MemoryStore, OwnershipStore, RedisStore, redis_client
from app.prefix import PrefixKeys, chat_keys, completion_keys, effective_tenant
from app.proxy import Attempt, BytesResponse, Dispatcher, RelayResponse, make_session
from app.routing import CostWeights, LeastLoaded, Ownership, RouteRequest, make_policy
from app.security import KeyRing, tenant_salt
from app.stream_stats import (
    StreamScanner,
    figures,
    render_stats_event,
    stats_format,
    usage_figures,
)
from app.tenancy import parse_networks, tenant_from
from app.tracing import tracing_from_settings

log = logging.getLogger("kvroute.api")

Kind = Literal["chat", "completions"]
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
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
PIPELINE = [
    {"stage": "client", "does": "OpenAI-compatible request to the router"},
    {
        "stage": "admission",
        "does": "API key, size and shape checks (OpenAI-style 4xx), tenant rates, in-flight "
        "limits and a queue that is fair across tenants (429 + Retry-After past it)",
    },
    {
        "stage": "prefix key",
        "does": "tenant + model + system prompt + conversation opening -> keys",
    },
    {
        "stage": "backend selection",
        "does": "one cost: uncached prompt tokens + weighted load, bounded",
    },
    {
        "stage": "vLLM",
        "does": "request forwarded; retried on another backend before the first byte",
    },
    {"stage": "stream stats", "does": "router.stream_stats chunk before data: [DONE]"},
]


def error_response(exc: KvrouteError, request_id: str | None = None) -> BytesResponse:
    headers = {**JSON_HEADERS, **exc.headers()}
    if request_id:
        headers["x-request-id"] = request_id
    return BytesResponse(exc.status, exc.body(), headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


_TYPED_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "model": (str, "a string"),
    "stream": (bool, "a boolean"),
    "stream_options": (dict, "an object"),
    "max_tokens": (int, "an integer"),
    "max_completion_tokens": (int, "an integer"),
    "n": (int, "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "user": (str, "a string"),
    "cache_salt": (str, "a string"),
}


def check_fields(
    body: Mapping[str, Any], kind: Kind, max_messages: int, max_tokens_cap: int
) -> None:
    for name, (types, words) in _TYPED_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise BadRequest(f"'{name}' must be {words}", param=name)
    if max_tokens_cap:
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and value > max_tokens_cap:
                raise BadRequest(
                    f"'{name}' is {value}; this router allows at most {max_tokens_cap}", param=name
                )
    if kind == "chat":
        messages = body.get("messages")
        if messages is None:
            raise BadRequest("'messages' is required", param="messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", param="messages")
        if len(messages) > max_messages:
            raise BadRequest(
                f"'messages' has {len(messages)} entries; the limit is {max_messages}",
                param="messages",
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(
                    f"messages[{i}] must be an object with a string 'role'", param="messages"
                )
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise BadRequest(
                    f"messages[{i}].content must be a string or an array of parts",
                    param="messages",
                )
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise BadRequest("'prompt' is required", param="prompt")
        if not _is_prompt(prompt):
            raise BadRequest(
                "'prompt' must be a string, an array of strings or an array of token ids",
                param="prompt",
            )


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return True
    return all(
        isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    )


class Router:
    """The app's state and request handlers; built by `create_app`, lives for the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = RouterMetrics(on_record=self._observed)
        self.request_log = RequestLog()
        self.tracing = tracing_from_settings(settings)
        self.trusted = parse_networks(settings.trusted_proxies)
        self.redis = (
            redis_client(settings.redis_url, settings.redis_timeout_s)
            if settings.redis_url
            else None
        )
        self.store: OwnershipStore = (
            RedisStore(
                self.redis,
                settings.redis_url,
                ttl_s=settings.ownership_ttl_s,
                timeout_s=settings.redis_timeout_s,
                retry_s=settings.redis_retry_s,
            )
            if self.redis is not None
            else MemoryStore(settings.ownership_ttl_s)
        )
        self.pool = BackendPool(
            settings.backend_urls,
            default_model=settings.served_model,
            unhealthy_after_failures=settings.unhealthy_after_failures,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown_s=settings.breaker_cooldown_s,
            on_restart=self._backend_restarted,
        )
        self.weights = CostWeights(
            w_prefill=settings.w_prefill,
            w_load=settings.w_load,
            w_waiting=settings.w_waiting,
            cap_factor=settings.load_cap_factor,
            cap_floor=settings.load_cap_floor,
        )
        self.policy = make_policy(settings.routing_policy, self.weights)
        self.keyring = KeyRing(settings.router_api_keys)
        self.admission = Admission(
            Limits(
                max_in_flight=settings.max_in_flight,
                max_in_flight_per_tenant=settings.max_in_flight_per_tenant,
                max_queue=settings.max_queue,
                max_queue_per_tenant=settings.max_queue_per_tenant,
                queue_timeout_s=settings.queue_timeout_s,
            )
        )
        self.rates: RateLimits | RedisRateLimits = (
            RedisRateLimits(
                self.redis,
                settings.tenant_rpm,
                settings.tenant_tpm,
                timeout_s=max(settings.redis_timeout_s, 0.05),
            )
            if self.redis is not None
            else RateLimits(settings.tenant_rpm, settings.tenant_tpm)
        )
        self.passthrough_policy = LeastLoaded()
        self.dispatcher: Dispatcher | None = None
        self.started_at = int(time.time())
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            self.metrics.collector(
                self._prom_gauges,
                lambda: self.store.fallbacks if isinstance(self.store, RedisStore) else 0,
                self.rejections,
            )
        )
        self.series = SeriesRecorder(self.metrics, self.pool)
        self.tenant_tags = TenantTags()
        self._tasks: list[asyncio.Task[None]] = []
        self._oneshots: set[asyncio.Task[None]] = set()

    # --- lifespan ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        s = self.settings
        session = make_session(
            connect_timeout_s=s.connect_timeout_s,
            pool_idle_timeout_s=s.pool_idle_timeout_s,
            max_per_host=s.max_connections_per_backend,
        )
        self.dispatcher = Dispatcher(
            pool=self.pool,
            policy=self.policy,
            ownership=self.store,
            session=session,
            read_timeout_s=s.read_timeout_s,
            retries=s.retries,
            retry_budget_s=s.retry_budget_s,
            max_in_flight_per_backend=s.max_in_flight_per_backend,
        )
        await self.pool.probe_health(session, s.probe_timeout_s)
        await self.pool.probe_metrics(session, s.probe_timeout_s)
        if not self.pool.any_healthy():
            log.warning("no backend is healthy yet; requests get 503 until one answers /health")
        self._tasks.append(
            asyncio.create_task(
                self.pool.run_probes(
                    session,
                    health_interval_s=s.health_interval_s,
                    metrics_interval_s=s.metrics_interval_s,
                    timeout_s=s.probe_timeout_s,
                )
            )
        )
        self._tasks.append(asyncio.create_task(self.series.run()))
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await session.close()
            self.tracing.shutdown()
            if isinstance(self.store, RedisStore):
                await self.store.close()
            if self.redis is not None:
                await self.redis.aclose()

    def _backend_restarted(self, backend: str) -> None:
        task = asyncio.create_task(self.store.forget_backend(backend))
        # Short-lived: kept referenced until it ends, not in the lifespan's list of loops.
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)

    def _observed(self, rec: RequestRecord) -> None:
        """A request is over (called once, from `metrics.record`): its log line and trace."""
        self.request_log.emit(rec)
        if rec.scope is not None and rec.scope.trace is not None:
            rec.scope.trace.end(rec)

    # --- generation ----------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "chat", "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completions", "/v1/completions")

    def resolve_model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        served = self.pool.models()
        if not model:
            model = self.settings.served_model or (next(iter(served)) if len(served) == 1 else "")
            if not model:
                raise BadRequest("'model' is required", param="model")
        if model not in served:
            if not self.pool.any_healthy():
                raise NoHealthyBackend("no backend is healthy; try again shortly")
            names = ", ".join(sorted(served)) or "none"
            raise ModelNotFound(
                f"The model `{model}` does not exist. Models served: {names}.", param="model"
            )
        return str(model)

    def rejections(self) -> dict[str, int]:
        """Admission rejections by reason: queue limits and tenant rates (`rate_rpm`, ...)."""
        local = self.rates.local if isinstance(self.rates, RedisRateLimits) else self.rates
        rates = {f"rate_{kind}": n for kind, n in local.rejected.items()}
        return {**self.admission.stats.rejected, **rates}

    def _refused(
        self, exc: KvrouteError, endpoint: str, scope: RequestScope, request_id: str
    ) -> BytesResponse:
        """A request answered with our own error: its log line and metric, then the error body."""
        self.metrics.record(
            RequestRecord(
                endpoint=endpoint, status=exc.status, error_kind=type(exc).__name__, scope=scope
            )
        )
        return error_response(exc, request_id)

    def _client_gone(self, endpoint: str, scope: RequestScope) -> None:
        """The client left before an answer started: still one log line, metric and span."""
        self.metrics.client_disconnects += 1
        self.metrics.record(
            RequestRecord(endpoint=endpoint, status=499, error_kind="ClientGone", scope=scope)
        )

    def route_for(
        self, kind: Kind, tenant: str, model: str, body: Mapping[str, Any]
    ) -> RouteRequest:
        keyed_tenant = effective_tenant(tenant, body.get("cache_salt"))
        window = self.settings.prefix_window_chars
        keys = (
            chat_keys(keyed_tenant, model, body["messages"], window)
            if kind == "chat"
            else completion_keys(keyed_tenant, model, body["prompt"], window)
        )
        per_token = self.settings.chars_per_token
        return RouteRequest(
            model=model,
            keys=keys,
            prompt_tokens=int(keys.prompt_chars / per_token) + 1,
            system_tokens=int(keys.system_chars / per_token),
        )

    def ready_for(self, model: str) -> Callable[[], bool]:
        """Whether some healthy backend serving `model` can take one more request now."""
        per_backend = self.settings.max_in_flight_per_backend
        max_waiting = self.settings.max_backend_waiting

        def ready() -> bool:
            return any(
                b.healthy
                and model in b.models
                and b.in_flight < per_backend
                and (b.metrics is None or b.metrics.waiting <= max_waiting)
                for b in self.pool.backends
            )

        return ready

    def upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.settings.backend_api_key:
            headers["Authorization"] = f"Bearer {self.settings.backend_api_key}"
        elif "authorization" in request.headers and not self.keyring.enabled:
            # Without router keys the client's key is meant for vLLM; with them it is ours.
            headers["Authorization"] = request.headers["authorization"]
        traceparent = request.headers.get("traceparent")
        if traceparent:
            headers["traceparent"] = traceparent
        return headers

    async def generate(self, request: Request, kind: Kind, path: str) -> Response:
        start = time.monotonic()
        request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
        endpoint = "chat" if kind == "chat" else "completions"
        trace = self.tracing.start("POST", path, request.headers)
        scope = RequestScope(request_id, start, trace)
        try:
            trace.phase("admission")
            bound_tenant = self.keyring.authenticate(request.headers.get("authorization"))
            raw = await read_body(request, self.settings.max_body_bytes)
            body = parse_json_object(raw)
            check_fields(body, kind, self.settings.max_messages, self.settings.max_tokens_cap)
            model = scope.model = self.resolve_model(body)
            peer = request.client.host if request.client else None
            tenant = bound_tenant or tenant_from(request.headers, peer, self.trusted)
            scope.tenant = tenant
            rewrite = not body.get("model")
            body["model"] = model
            if self.settings.tenant_cache_salt:
                body["cache_salt"] = tenant_salt(self.settings.cache_salt_secret, tenant)
                rewrite = True
            route = self.route_for(kind, tenant, model, body)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
            if self.rates.enabled:
                await self.rates.check(tenant, route.prompt_tokens + int(max_tokens))
            slot = await self.admission.acquire(tenant, self.ready_for(model))
        except asyncio.CancelledError:
            self._client_gone(endpoint, scope)  # left while queued or while we read its body
            raise
        except KvrouteError as exc:
            return self._refused(exc, endpoint, scope, request_id)

        try:
            trace.phase("selection")
            ownership = await self.store.lookup(route.keys)
            if not self.settings.system_affinity and ownership.system_holders:
                ownership = replace(ownership, system_holders=())
            stream = body.get("stream") is True
            options = body.get("stream_options") or {}
            client_wants_usage = stream and options.get("include_usage") is True
            if stream and not client_wants_usage:
                body["stream_options"] = {**options, "include_usage": True}
                rewrite = True
            if rewrite:
                raw = orjson.dumps(body)
            assert self.dispatcher is not None
            attempt = await self.dispatcher.open(
                route,
                ownership,
                path,
                raw,
                self.upstream_headers(request),
                request_id,
                start,
                trace=trace,
            )
        except KvrouteError as exc:
            slot.release()
            return self._refused(exc, endpoint, scope, request_id)
        except BaseException as exc:
            slot.release()
            if isinstance(exc, asyncio.CancelledError):
                self._client_gone(endpoint, scope)
            raise

        decision = attempt.decision
        response_headers = {
            "x-request-id": request_id,
            "x-router-backend": decision.backend,
            "x-router-cache-outcome": decision.outcome,
        }
        upstream = attempt.response
        if upstream.status != 200 or not stream:
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.metrics.record(
                    RequestRecord(
                        endpoint=endpoint,
                        status=502,
                        backend=decision.backend,
                        error_kind="UpstreamBroken",
                        scope=scope,
                    )
                )
                reason = f"backend {decision.backend} failed while answering: {exc}"
                return error_response(UpstreamBroken(reason, backend=decision.backend), request_id)
            finally:
                slot.release()
                self.pool.release(decision.backend)
                upstream.release()
            return await self._answer_whole(route, endpoint, attempt, data, response_headers, scope)

        stats_form = stats_format(request.headers.get("x-router-stream-stats"), self.settings)
        scanner = StreamScanner(strip_usage=not client_wants_usage, start_s=start)
        default_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def finish(scan: StreamScanner, aborted: bool, error: str | None) -> bytes:
            slot.release()
            self.pool.release(decision.backend)
            fig = figures(
                scan,
                estimated_prompt_tokens=route.prompt_tokens,
                estimated_cached_tokens=decision.cached_tokens,
            )
            if not aborted and error is None:
                await self.store.record(
                    route.keys,
                    decision.backend,
                    fig.prompt_tokens + fig.completion_tokens,
                    claim=False,
                )
            if aborted:
                self.metrics.client_disconnects += 1
            self.metrics.record(
                RequestRecord(
                    endpoint=endpoint,
                    status=499 if aborted else 200,
                    backend=decision.backend,
                    outcome=decision.outcome,
                    affinity=decision.affinity,
                    ttft_ms=fig.ttft_ms,
                    tps=fig.tps,
                    prompt_tokens=fig.prompt_tokens,
                    completion_tokens=fig.completion_tokens,
                    cached_tokens=fig.cached_tokens,
                    bytes_out=scan.bytes_in,
                    retries=attempt.retries,
                    error_kind="UpstreamBroken" if error else None,
                    stream=True,
                    scope=scope,
                )
            )
            if stats_form == "none":
                return b""
            stats = {
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
                "prefix_key": route.keys.conversation,
                "tenant": tenant,
                "retries": attempt.retries,
                "queue_ms": round(slot.queue_ms, 3),
                "request_id": request_id,
            }
            if error:
                stats["error"] = error
            return render_stats_event(scan.meta, default_object, stats, stats_form)

        return RelayResponse(upstream, scanner, {**SSE_HEADERS, **response_headers}, finish)

    async def _answer_whole(
        self,
        route: RouteRequest,
        endpoint: str,
        attempt: Attempt,
        data: bytes,
        headers: dict[str, str],
        scope: RequestScope | None = None,
    ) -> Response:
        decision = attempt.decision
        status = attempt.response.status
        content_type = attempt.response.headers.get("content-type", "application/json")
        record = RequestRecord(
            endpoint=endpoint,
            status=status,
            backend=decision.backend,
            retries=attempt.retries,
            bytes_out=len(data),
            scope=scope,
        )
        if status == 200:
            record.outcome, record.affinity = decision.outcome, decision.affinity
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                usage = orjson.loads(data).get("usage")
                if isinstance(usage, dict):
                    prompt, completion, cached = usage_figures(usage)
                    record.prompt_tokens, record.completion_tokens = prompt, completion
                    record.cached_tokens = cached
            if record.prompt_tokens:
                await self.store.record(
                    route.keys,
                    decision.backend,
                    record.prompt_tokens + record.completion_tokens,
                    claim=False,
                )
        else:
            record.error_kind = f"backend_{status}"
        self.metrics.record(record)
        return BytesResponse(status, data, {"content-type": content_type, **headers})

    # --- passthrough ---------------------------------------------------------------------
    async def passthrough(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
        endpoint = request.url.path
        start = time.monotonic()
        trace = self.tracing.start("POST", endpoint, request.headers)
        scope = RequestScope(request_id, start, trace)
        try:
            self.keyring.authenticate(request.headers.get("authorization"))
            raw = await read_body(request, self.settings.max_body_bytes)
            content_type = request.headers.get("content-type", "application/json")
            if content_type.startswith("application/json"):
                model = self.resolve_model(parse_json_object(raw))
            else:
                model = self.resolve_model({})
            scope.model = model
            keys = PrefixKeys(conversation=request_id, system="", prompt_chars=0, system_chars=0)
            route = RouteRequest(model=model, keys=keys, prompt_tokens=0, system_tokens=0)
            headers = {**self.upstream_headers(request), "Content-Type": content_type}
            assert self.dispatcher is not None
            attempt = await self.dispatcher.open(
                route,
                Ownership(),
                request.url.path,
                raw,
                headers,
                request_id,
                start,
                policy=self.passthrough_policy,
                remember=False,
                trace=trace,
            )
        except KvrouteError as exc:
            return self._refused(exc, endpoint, scope, request_id)
        try:
            data = await attempt.response.read()
        finally:
            self.pool.release(attempt.decision.backend)
            attempt.response.release()
        self.metrics.record(
            RequestRecord(
                endpoint=endpoint,
                status=attempt.response.status,
                backend=attempt.decision.backend,
                bytes_out=len(data),
                scope=scope,
            )
        )
        return BytesResponse(
            attempt.response.status,
            data,
            {
                "content-type": attempt.response.headers.get("content-type", "application/json"),
                "x-request-id": request_id,
                "x-router-backend": attempt.decision.backend,
            },
        )

    # --- fleet and introspection ---------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self.keyring.authenticate(request.headers.get("authorization"))
        except KvrouteError as exc:
            return error_response(exc)
        data = []
        for model, max_len in sorted(self.pool.models().items()):
            card: dict[str, Any] = {
                "id": model,
                "object": "model",
                "created": self.started_at,
                "owned_by": "vllm",
            }
            if max_len is not None:
                card["max_model_len"] = max_len
            data.append(card)
        return BytesResponse(200, orjson.dumps({"object": "list", "data": data}), JSON_HEADERS)

    def backend_status(self) -> list[dict[str, Any]]:
        owned = self.store.owned_counts()
        out = []
        for b in self.pool.backends:
            metrics = b.metrics
            out.append(
                {
                    "name": b.name,
                    "url": b.url,
                    "healthy": b.healthy,
                    "models": sorted(b.models),
                    "in_flight": b.in_flight,
                    "dispatched": b.dispatched,
                    "owned_keys": owned.get(b.name, 0),
                    "last_error": b.last_error or None,
                    "vllm": None
                    if metrics is None
                    else {
                        "running": metrics.running,
                        "waiting": metrics.waiting,
                        "kv_cache_usage": metrics.kv_usage,
                        "prefix_cache_hit_rate": round(
                            metrics.prefix_hits / metrics.prefix_queries, 4
                        )
                        if metrics.prefix_queries
                        else None,
                    },
                }
            )
        return out

    async def health(self, request: Request) -> Response:
        ready = self.pool.any_healthy()
        body = {
            "status": "ok" if ready else "unavailable",
            "ready": ready,
            "backends": self.backend_status(),
        }
        return BytesResponse(200 if ready else 503, orjson.dumps(body), JSON_HEADERS)

    async def live(self, request: Request) -> Response:
        return BytesResponse(200, b'{"status":"alive"}', JSON_HEADERS)

    def _prom_gauges(self) -> dict[str, dict[str, float]]:
        owned = self.store.owned_counts()
        return {
            "backend_in_flight": {b.name: b.in_flight for b in self.pool.backends},
            "backend_healthy": {b.name: float(b.healthy) for b in self.pool.backends},
            "backend_owned_keys": {b.name: owned.get(b.name, 0) for b in self.pool.backends},
            # As each backend's vLLM last reported them (none before its first scrape).
            "backend_waiting_requests": {
                b.name: b.metrics.waiting for b in self.pool.backends if b.metrics is not None
            },
            "backend_running_requests": {
                b.name: b.metrics.running for b in self.pool.backends if b.metrics is not None
            },
            "backend_kv_cache_usage_ratio": {
                b.name: b.metrics.kv_usage for b in self.pool.backends if b.metrics is not None
            },
        }

    async def dashboard(self, request: Request) -> Response:
        return BytesResponse(200, page_html(), page_headers())

    async def dashboard_data(self, request: Request) -> Response:
        data = dashboard_data(
            now_s=time.time(),
            samples=self.series.samples,
            backends=self.backend_status(),
            metrics=self.metrics,
            tags=self.tenant_tags,
            policy=self.settings.routing_policy,
        )
        return BytesResponse(200, orjson.dumps(data), {**JSON_HEADERS, "cache-control": "no-store"})

    async def metrics_endpoint(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return BytesResponse(
                200, generate_latest(self.registry), {"content-type": CONTENT_TYPE_LATEST}
            )
        extra = {
            "in_flight": {b.name: b.in_flight for b in self.pool.backends},
            "backends": self.backend_status(),
            "ownership": self.store.describe(),
            "admission": {**self.admission.snapshot(), "rejected": self.rejections()},
            "policy": self.settings.routing_policy,
        }
        return BytesResponse(200, orjson.dumps(self.metrics.snapshot(extra)), JSON_HEADERS)

    async def architecture(self, request: Request) -> Response:
        body = {
            "name": "kvroute",
            "pipeline": PIPELINE,
            "policy": {
                "name": self.settings.routing_policy,
                "cost": "w_prefill * (prompt_tokens - cached_tokens(b)) + w_load * load(b)",
                "load": "in_flight(b) + w_waiting * queued(b); queued = in_flight past b's learned "
                "capacity, or vLLM's num_requests_waiting until the capacity is known",
                "cap": "in_flight(b) + 1 <= "
                "max(load_cap_factor * (total_in_flight + 1) / n, load_cap_floor)",
            },
            "ownership": self.store.describe(),
            "backends": [{"name": b.name, "url": b.url} for b in self.pool.backends],
            "settings": self.settings.public_view(),
        }
        return BytesResponse(200, orjson.dumps(body), JSON_HEADERS)


class _NotImplementedYet:
    def __init__(self, message: str) -> None:
        self.error = KvrouteError(message)
        self.error.status, self.error.type, self.error.code = 501, "not_implemented", "unsupported"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(self.error)(scope, receive, send)


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`WORKERS` > 1): settings from the environment."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def internal_error(path: str) -> BytesResponse:
    """Logs the exception being handled; the client gets an OpenAI-style 500, no traceback."""
    log.exception("unexpected error on %s", path)
    return error_response(KvrouteError("internal router error; see the router log"))


class RouterApp(FastAPI):
    """FastAPI with a direct path for the two generation routes.

    They skip Starlette's middleware and route matching (about 10% of the router's CPU per
    streamed request, measured with bench.overhead); every other path goes through FastAPI."""

    fast_routes: dict[str, Callable[[Request], Awaitable[Response]]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.fast_routes.get(scope["path"])
            if handler is not None:
                try:
                    response = await handler(Request(scope, receive, send))
                except Exception:
                    response = internal_error(scope["path"])
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    router = Router(settings)
    app = RouterApp(
        title="kvroute",
        version="0.1.0",
        lifespan=router.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.router = router

    def route(
        path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]
    ) -> None:
        app.add_route(path, handler, methods=methods)

    route("/v1/chat/completions", router.chat, ["POST"])
    route("/v1/completions", router.completions, ["POST"])
    app.fast_routes = {"/v1/chat/completions": router.chat, "/v1/completions": router.completions}
    for path in PASSTHROUGH_PATHS:
        route(path, router.passthrough, ["POST"])
    route("/v1/models", router.models, ["GET"])
    route("/health", router.health, ["GET"])
    route("/ready", router.health, ["GET"])
    route("/live", router.live, ["GET"])
    route("/metrics", router.metrics_endpoint, ["GET"])
    route("/architecture", router.architecture, ["GET"])
    route("/dashboard", router.dashboard, ["GET"])
    route("/dashboard/data", router.dashboard_data, ["GET"])
    app.mount(
        "/v1/responses",
        _NotImplementedYet(
            "kvroute does not route the stateful Responses API yet; use /v1/chat/completions"
        ),
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = KvrouteError(f"{request.method} {request.url.path}: {exc.detail}")
        error.status = exc.status_code
        error.type = "invalid_request_error"
        error.code = "not_found" if exc.status_code == 404 else "method_not_allowed"
        return error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.url.path)

    return app
