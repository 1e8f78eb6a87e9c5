"""Continuous load on a router (streams and whole answers, aiohttp in a thread of its own), with
every request's outcome kept, for the fleet-change tests."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import httpx

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Outcome:
    stream: bool
    status: int
    backend: str
    ok: bool
    detail: str
    started_s: float
    ended_s: float


class Load:
    """``with Load(url) as load:`` sends requests from `workers` loops until the block ends."""

    def __init__(
        self,
        url: str,
        *,
        workers: int = 8,
        max_tokens: int = 12,
        model: str = "sim-model",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.workers = workers
        self.max_tokens = max_tokens
        self.model = model
        self.headers = headers or {}
        self.outcomes: list[Outcome] = []
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the load did not stop within 30 s"

    def failed(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]

    def count(self) -> int:
        return len(self.outcomes)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, w) for w in range(self.workers)))

    async def _worker(self, session: aiohttp.ClientSession, worker: int) -> None:
        while not self._stop.is_set():
            i = next(self._ids)
            self.outcomes.append(await self._one(session, i, stream=i % 2 == 0))

    async def _one(self, session: aiohttp.ClientSession, i: int, *, stream: bool) -> Outcome:
        payload: dict[str, Any] = {
            "model": self.model,
            "stream": stream,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": f"conversation {i}"}],
        }
        start = time.monotonic()
        try:
            async with session.post(
                f"{self.url}/v1/chat/completions", json=payload, headers=self.headers
            ) as resp:
                raw = await resp.read()
                status, backend = resp.status, resp.headers.get("x-router-backend", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Outcome(stream, 0, "", False, repr(exc), start, time.monotonic())
        ok, detail = judge(status, raw, stream)
        return Outcome(stream, status, backend, ok, detail, start, time.monotonic())


def judge(status: int, raw: bytes, stream: bool) -> tuple[bool, str]:
    """Whether a request succeeded whole: a stream ends with [DONE] and carries no error."""
    if status != 200:
        return False, f"status {status}: {raw[:200]!r}"
    if not stream:
        return True, ""
    if not raw.endswith(DONE):
        return False, f"stream without [DONE]: {raw[-200:]!r}"
    if b'data: {"error"' in raw:
        return False, f"stream with an error event: {raw[-300:]!r}"
    return True, ""


def sim_requests(sim_url: str) -> int:
    """Generation requests the simulator has received."""
    stats = httpx.get(f"{sim_url}/sim/stats", timeout=5).json()
    return int(sum(stats["requests"].values()))
