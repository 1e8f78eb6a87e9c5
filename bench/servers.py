"""The servers a bench runs: the router (``kvroute_server``) and the peer routers, each a
``harness`` child process, ready once a streaming chat request through it completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from bench.loadgen import CHAT_PATH, chat_body
from bench.peers import PeerPlan
from harness.process import ChildServer
from harness.router import RouterProcess

MODEL = "bench-model"
# A database of the benches' own on the default local Redis (the tests use 13).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def forget_router_state(redis_url: str) -> None:
    """Delete what an earlier router left in the benches' Redis (a database of their own):
    ownership, so that rows of one round can replay the same tenants and keys (a record of the
    row before, whose backends were restarted since, would count as a hit), and the fleet
    membership, which wins over a router's BACKEND_URLS (another run's fleet there drained all
    backends but b0 of every Redis row)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match="kvroute:*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start : start + 1000])
    finally:
        client.close()


async def start_server(
    server: ChildServer,
    stack: contextlib.ExitStack | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    forget: bool = True,
) -> ChildServer:
    """Start ``server`` and wait until it streams a chat answer. It is stopped when ``stack``
    closes; without a stack, by the caller. A router on Redis starts on a Redis cleared of
    earlier routers' state, unless ``forget`` is false (a second replica of the same row)."""
    if stack is not None:
        stack.callback(server.stop)
    if forget and isinstance(server, RouterProcess) and server.env.get("REDIS_URL"):
        forget_router_state(server.env["REDIS_URL"])
    await asyncio.to_thread(server.start, 60.0)  # a router's start waits for its /health
    await wait_ready(server, headers or {})
    return server


async def wait_ready(
    server: ChildServer, headers: Mapping[str, str], timeout_s: float = 60.0
) -> None:
    """Until one streaming chat request through `server` completes with [DONE]."""
    deadline = time.monotonic() + timeout_s
    body = chat_body(MODEL, 0, 2, 1)
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            server.check_alive()
            try:
                async with session.post(
                    server.url + CHAT_PATH,
                    data=body,
                    headers={"Content-Type": "application/json", **headers},
                ) as response:
                    data = await response.read()
                    if response.status == 200 and b"[DONE]" in data:
                        return
                    last = f"status {response.status}: {data[:200]!r}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.2)
    raise server.failure(f"not ready after {timeout_s} s ({last})")


def kvroute_server(
    backend_urls: Sequence[str],
    log_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    *,
    checkout: Path | None = None,
) -> RouterProcess:
    """kvroute from this tree, or (`checkout`) from another one: a before/after in one run."""
    env = {"BACKEND_URLS": ",".join(backend_urls), "SERVED_MODEL": MODEL, **(extra_env or {})}
    workers = env.get("WORKERS", "1")
    name = "kvroute" if workers == "1" and "REDIS_URL" not in env else f"kvroute x{workers}"
    if checkout is None:
        return RouterProcess(env, name=name, log_dir=log_dir)
    return RouterProcess(
        env, name=f"kvroute@{checkout.name}", log_dir=log_dir, main=checkout / "main.py"
    )


def peer_server(plan: PeerPlan, log_dir: Path) -> ChildServer:
    folder = log_dir / plan.name
    folder.mkdir(exist_ok=True)
    for filename, text in plan.files.items():
        (folder / filename).write_text(text)
    argv = [arg.replace("{dir}", str(folder)) for arg in plan.argv]
    return ChildServer(
        plan.name, argv, port=plan.port, env={**os.environ, **plan.env}, cwd=folder, log_dir=log_dir
    )
