"""Keep a server's queue full from a process of its own, until it is stopped.

    python -m tests.realvllm.flood URL CLIENTS BODY_JSON

Each of CLIENTS clients posts BODY_JSON to URL, and again as soon as its answer comes. A process of
its own, not tasks in the test's loop: there they shared an interpreter with the router's thread
and the test, which two cores at times leave unscheduled for 10-30 s. (B's queue still empties and
refills about every 40 s from here: vLLM's log reads Waiting 80, 56, 32, 8, 88, 68 ... 10 s apart,
its answers coming back in surges; the test allows for that.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx


async def one_client(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    # A connection refused ends the process: the server is gone (its test ended, or died).
    while True:
        response = await client.post(url, json=body)
        if response.status_code != 200:  # the test reads this process's stderr when it fails
            print(f"flood: {response.status_code} {response.text[:200]}", file=sys.stderr)
            await asyncio.sleep(0.5)


async def flood(url: str, clients: int, body: dict[str, Any]) -> None:
    # Whole answers, not streams: 40 streams of 1500 tokens each took vLLM's API server so
    # long to send that clients stopped coming back; whole answers leave the queue to the engine.
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(one_client(client, url, body) for _ in range(clients)))


if __name__ == "__main__":
    target, count, raw = sys.argv[1:4]
    asyncio.run(flood(target, int(count), json.loads(raw)))
