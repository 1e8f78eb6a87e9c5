"""``--register ROUTER_URL``: the deployed server joins a running router, and leaves it drained.

The router's admin API (``/admin/backends``) is called with the key from the environment
(``KVROUTE_ADMIN_API_KEY`` or ``ADMIN_API_KEY``), never from argv. A deployment is registered
under a name derived from its host and port, so that ``deploy stop`` finds it whatever URL it
was reached by (a tunnel's or the host's). Both directions are idempotent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.deploy import RegisterError, UsageError
from app.deploy.spec import SshTarget

ADMIN_KEY_VARIABLES = ("KVROUTE_ADMIN_API_KEY", "ADMIN_API_KEY")
POLL_S = 0.25


def admin_key(environ: Mapping[str, str]) -> str:
    for name in ADMIN_KEY_VARIABLES:
        if environ.get(name):
            return environ[name]
    raise UsageError(
        "--register needs the router's admin key",
        "export KVROUTE_ADMIN_API_KEY=... (the router's ADMIN_API_KEY); it is never read from argv",
    )


def backend_name(target: SshTarget, vllm_port: int) -> str:
    """`gpu1-8000`: the host and port, in the characters a backend name allows."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{target.host}-{vllm_port}").strip("-")[:64]


@dataclass(frozen=True, slots=True)
class RouterAdmin:
    url: str
    key: str
    timeout_s: float = 10.0

    async def _call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"}
        data = None if body is None else orjson.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method, self.url.rstrip("/") + path, data=data, headers=headers
                ) as r,
            ):
                raw = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegisterError(
                f"router {self.url} unreachable: {type(exc).__name__}: {exc}",
                "check --register (the router's base URL) and that the router runs",
            ) from exc
        try:
            return r.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return r.status, None

    def _refused(self, what: str, status: int, payload: Any) -> RegisterError:
        message = ""
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            message = str(payload["error"].get("message", ""))
        fix = "check --register: is it the router, with ADMIN_API_KEY set?"
        if status == 401:
            fix = "KVROUTE_ADMIN_API_KEY must equal the router's ADMIN_API_KEY"
        return RegisterError(f"router {self.url} refused to {what} ({status} {message})", fix)

    async def backends(self) -> list[dict[str, Any]]:
        status, payload = await self._call("GET", "/admin/backends")
        if status != 200 or not isinstance(payload, dict):
            raise self._refused("list its backends", status, payload)
        return list(payload.get("data") or [])

    async def register(self, url: str, name: str, api_key: str | None = None) -> str:
        """Add the backend unless it is there; answers what was done."""
        for b in await self.backends():
            if b.get("name") == name and b.get("url") == url:
                return f"already registered as {name} ({b.get('state')})"
            if b.get("name") == name or b.get("url") == url:
                raise RegisterError(
                    f"router {self.url} has {b.get('name')} at {b.get('url')}, not {name} at {url}",
                    f"drain it first: kvroute deploy stop ... --register {self.url}, or "
                    "DELETE /admin/backends/NAME",
                )
        body: dict[str, str] = {"url": url, "name": name}
        if api_key:
            body["api_key"] = api_key
        status, payload = await self._call("POST", "/admin/backends", body)
        if status != 201:
            raise self._refused(f"add {url}", status, payload)
        return f"registered as {name}"

    async def wait_serving(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {b.get("name"): b.get("state") for b in await self.backends()}
            if states.get(name) == "serving":
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def drain(self, name: str, timeout_s: float) -> str:
        """Drain the backend and wait until the router has let it go; answers what was done."""
        if not any(b.get("name") == name for b in await self.backends()):
            return f"{name} not registered"
        status, payload = await self._call("DELETE", f"/admin/backends/{name}")
        if status == 404:
            return f"{name} not registered"
        if status != 202:
            raise self._refused(f"drain {name}", status, payload)
        started = time.monotonic()
        while any(b.get("name") == name for b in await self.backends()):
            if time.monotonic() - started > timeout_s:
                raise RegisterError(
                    f"{name} still drains on {self.url} after {timeout_s:.0f} s",
                    "raise --drain-timeout-s, or cut it: DELETE /admin/backends/NAME?drain=false",
                )
            await asyncio.sleep(POLL_S)
        return f"{name} drained ({time.monotonic() - started:.1f} s)"
