"""`create_app(settings)`: the router's routes, lifespan and error handlers.

The request path (generation and passthrough routes) is raw ASGI (`app.handlers`), reached
before Starlette's middleware and routing: it is most of the router's work, and Starlette's
layers cost about 10% of its CPU per streamed request (measured with bench.overhead). The
introspection routes (/health, /metrics, ...) go through FastAPI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
from fastapi import FastAPI
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app import responses_path
from app.admin import admin_routes
from app.config import Settings, load_settings
from app.dashboard import dashboard_data, page_headers, page_html
from app.errors import KvrouteError, Unauthorized
from app.exchange import Call, raw_headers
from app.handlers import GENERATION_PATHS, PASSTHROUGH_PATHS, Work, generation, handle, passthrough
from app.logs import configure_logging
from app.presentation import architecture_body, backend_status, health_body, models_body
from app.responses_path import PATH as RESPONSES_PATH
from app.security import AdminKey
from app.services import Services, build_services, running

log = logging.getLogger("kvroute.api")

JSON_HEADERS = {"content-type": "application/json"}
ASGIHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


class BytesResponse(Response):
    """A response of prepared bytes; skips Starlette's header rendering."""

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


def error_response(exc: KvrouteError) -> BytesResponse:
    return BytesResponse(exc.status, exc.body(), {**JSON_HEADERS, **exc.headers()})


class RouterApp(FastAPI):
    """FastAPI with the request path (`fast_routes`, POST only) reached first."""

    services: Services
    fast_routes: dict[str, ASGIHandler]

    responses: ASGIHandler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            handler = self.fast_routes.get(path) if scope["method"] == "POST" else None
            if handler is not None:
                await handler(scope, receive, send)
                return
            if path == "/v1/responses" or path.startswith("/v1/responses/"):
                await self.responses(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _asgi(services: Services, endpoint: str | None, work: Work) -> ASGIHandler:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        call = Call(scope, receive, send)
        await handle(services, call, endpoint or call.path, work)

    return asgi


def _responses_asgi(services: Services) -> ASGIHandler:
    """`/v1/responses` and `/v1/responses/{id}[/cancel]` (`app.responses_path`)."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        call = Call(scope, receive, send)
        if call.path == RESPONSES_PATH:
            if scope["method"] != "POST":
                await error_response(_status_error(405, call.path))(scope, receive, send)
                return
            await handle(services, call, "responses", responses_path.create)
            return
        await handle(services, call, "/v1/responses/{id}", responses_path.stored)

    return asgi


def _status_error(status: int, path: str) -> KvrouteError:
    error = KvrouteError(f"{path}: method not allowed")
    error.status, error.type, error.code = status, "invalid_request_error", "method_not_allowed"
    return error


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`WORKERS` > 1): settings from the environment."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def create_app(settings: Settings, services: Services | None = None) -> RouterApp:
    svc = services or build_services(settings)

    def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        return running(svc)  # type: ignore[return-value]

    app = RouterApp(
        title="kvroute",
        version="0.1.0",
        lifespan=lifespan,  # type: ignore[arg-type]
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # Never a redirect built from the client's Host header (Starlette's trailing-slash one).
        redirect_slashes=False,
    )
    app.services = svc
    app.state.services = svc
    app.fast_routes = {
        path: _asgi(svc, kind, generation(kind)) for path, kind in GENERATION_PATHS.items()
    }
    app.fast_routes.update({path: _asgi(svc, None, passthrough) for path in PASSTHROUGH_PATHS})
    app.responses = _responses_asgi(svc)
    for path in app.fast_routes:
        # Registered for their other methods: a GET is answered 405, OpenAI-shaped.
        app.add_route(path, _method_not_allowed, methods=["POST"])
    _introspection_routes(app, svc)
    admin_routes(app, svc.fleet, AdminKey(settings.admin_api_key))
    _error_handlers(app)
    return app


async def _method_not_allowed(request: Request) -> Response:  # never reached for POST
    raise StarletteHTTPException(405)


def _introspection_routes(app: FastAPI, svc: Services) -> None:
    def route(path: str, handler: Callable[[Request], Awaitable[Response]]) -> None:
        app.add_route(path, handler, methods=["GET"])

    async def models(request: Request) -> Response:
        try:
            svc.keyring.authenticate(request.headers.get("authorization"))
        except Unauthorized as exc:
            return error_response(exc)
        body = models_body(svc.pool, svc.started_at)
        return BytesResponse(200, orjson.dumps(body), JSON_HEADERS)

    async def health(request: Request) -> Response:
        status, body = health_body(svc.pool, svc.store)
        return BytesResponse(status, orjson.dumps(body), JSON_HEADERS)

    async def live(request: Request) -> Response:
        return BytesResponse(200, b'{"status":"alive"}', JSON_HEADERS)

    async def metrics(request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            exposition = generate_latest(svc.registry)
            return BytesResponse(200, exposition, {"content-type": CONTENT_TYPE_LATEST})
        extra = {
            "in_flight": {b.name: b.in_flight for b in svc.pool.backends},
            "backends": backend_status(svc.pool, svc.store),
            "ownership": svc.store.describe(),
            "responses": svc.responses.describe(),
            "admission": {**svc.admission.snapshot(), "rejected": svc.rejections()},
            "bodies": svc.bodies.describe(),
            "rates": svc.rates.describe(),
            "policy": svc.settings.routing_policy,
        }
        return BytesResponse(200, orjson.dumps(svc.metrics.snapshot(extra)), JSON_HEADERS)

    async def architecture(request: Request) -> Response:
        body = architecture_body(svc.settings, svc.pool, svc.store)
        return BytesResponse(200, orjson.dumps(body), JSON_HEADERS)

    async def dashboard(request: Request) -> Response:
        return BytesResponse(200, page_html(), page_headers())

    async def dashboard_json(request: Request) -> Response:
        data = dashboard_data(
            now_s=time.time(),
            samples=svc.series.samples,
            backends=backend_status(svc.pool, svc.store),
            metrics=svc.metrics,
            tags=svc.tenant_tags,
            policy=svc.settings.routing_policy,
        )
        return BytesResponse(200, orjson.dumps(data), {**JSON_HEADERS, "cache-control": "no-store"})

    route("/v1/models", models)
    route("/health", health)
    route("/ready", health)
    route("/live", live)
    route("/metrics", metrics)
    route("/architecture", architecture)
    route("/dashboard", dashboard)
    route("/dashboard/data", dashboard_json)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = KvrouteError(f"{request.method} {request.url.path}: {exc.detail}")
        error.status = exc.status_code
        error.type = "invalid_request_error"
        error.code = "not_found" if exc.status_code == 404 else "method_not_allowed"
        return error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(KvrouteError("internal router error; see the router log"))
