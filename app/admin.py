"""The admin API (`/admin/backends`), on only when ADMIN_API_KEY is set: list, add, drain and
cut backends of the running router. Every change goes through `Fleet`."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from app.backends import Backend
from app.errors import BadRequest, KvrouteError
from app.fleet import Fleet, check_url
from app.security import AdminKey

JSON_HEADERS = {"content-type": "application/json"}
MAX_BODY_BYTES = 64 * 1024
_FIELDS = frozenset({"url", "name", "api_key"})


def backend_json(b: Backend) -> dict[str, Any]:
    """A backend as the admin API shows it: never its api_key."""
    return {
        "name": b.name,
        "url": b.url,
        "state": b.state,
        "models": sorted(b.models),
        "in_flight": b.in_flight,
        "last_error": b.last_error or None,
    }


def _json(status: int, body: object) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=JSON_HEADERS)


def _error(exc: KvrouteError) -> Response:
    return Response(exc.body(), status_code=exc.status, headers={**JSON_HEADERS, **exc.headers()})


def parse_add(raw: bytes) -> tuple[str, str | None, str]:
    """The body of POST /admin/backends: (url, name, api_key); BadRequest when malformed."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object such as {"url": "http://host:8000"}')
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    if "url" not in body:
        raise BadRequest("'url' is required", param="url")
    name, api_key = body.get("name"), body.get("api_key", "")
    if name is not None and not isinstance(name, str):
        raise BadRequest("'name' must be a string", param="name")
    if not isinstance(api_key, str):
        raise BadRequest("'api_key' must be a string", param="api_key")
    return check_url(body["url"]), name, api_key


def parse_drain(value: str | None) -> bool:
    if value is None or value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequest("'drain' must be true or false", param="drain")


def admin_routes(app: FastAPI, fleet: Fleet, key: AdminKey) -> None:
    """Register /admin/backends when the key is set (else they answer 404 like any path)."""
    if not key.enabled:
        return

    async def listing(request: Request) -> Response:
        try:
            key.check(request.headers.get("authorization"))
        except KvrouteError as exc:
            return _error(exc)
        data = [backend_json(b) for b in fleet.pool.backends]
        return _json(200, {"object": "list", "data": data})

    async def add(request: Request) -> Response:
        try:
            key.check(request.headers.get("authorization"))
            url, name, api_key = parse_add(await request.body())
            backend = await fleet.add(url, name=name, api_key=api_key)
        except KvrouteError as exc:
            return _error(exc)
        return _json(201, backend_json(backend))

    async def remove(request: Request) -> Response:
        try:
            key.check(request.headers.get("authorization"))
            drain = parse_drain(request.query_params.get("drain"))
            backend = await fleet.remove(request.path_params["name"], drain=drain)
        except KvrouteError as exc:
            return _error(exc)
        return _json(202 if drain else 200, backend_json(backend))

    app.add_route("/admin/backends", listing, methods=["GET"])
    app.add_route("/admin/backends", add, methods=["POST"])
    app.add_route("/admin/backends/{name}", remove, methods=["DELETE"])
