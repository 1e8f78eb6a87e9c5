"""Load generator for the benches: streaming chat completions over loopback with aiohttp.

`run_load(spec)` keeps `concurrency` streams open until `requests` were sent or `duration_s`
passed, and measures each request's TTFT (first content chunk), total time and streamed tokens;
`LoadResult.summary()` gives throughput and percentiles, and the generator's own CPU use, so a
saturated generator is seen rather than mistaken for a slow server.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from app.percentile import percentiles as quantiles

CHAT_PATH = "/v1/chat/completions"
EVENT_END = b"\n\n"
_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_ERROR = b'data: {"error"'
_DONE = b"data: [DONE]"
# A generator above this share of one core is the bottleneck, not the server it measures.
SATURATED_CPU_SHARE = 0.85


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One phase of load: where, how many at once, and for how long (a count or seconds)."""

    base_url: str
    model: str
    concurrency: int
    requests: int | None = None
    duration_s: float | None = None
    max_tokens: int = 64
    timeout_s: float = 60.0
    headers: Mapping[str, str] = field(default_factory=dict)
    conversations: int = 1000  # distinct openings cycled through, so prefix keys repeat
    warmup_per_worker: int = 1  # untimed requests per stream first: connections open, caches warm

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests and duration_s")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")


@dataclass(frozen=True, slots=True)
class RequestResult:
    status: int
    ttft_s: float | None
    total_s: float
    tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.ttft_s is not None


@dataclass(slots=True)
class LoadResult:
    spec: LoadSpec
    results: list[RequestResult]
    wall_s: float
    cpu_s: float  # this process's CPU time during the phase (user + system)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        ttft_ms = sorted(r.ttft_s * 1000 for r in ok if r.ttft_s is not None)
        total_ms = sorted(r.total_s * 1000 for r in ok)
        tokens = sum(r.tokens for r in ok)
        wall = self.wall_s or math.nan
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                key = r.error or f"status {r.status}"
                errors[key] = errors.get(key, 0) + 1
        cpu_share = self.cpu_s / wall
        return {
            "concurrency": self.spec.concurrency,
            "requests": len(self.results),
            "ok": len(ok),
            "errors": errors,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "tokens": tokens,
            "ttft_ms": percentiles(ttft_ms),
            "total_ms": percentiles(total_ms),
            "loadgen_cpu_s": round(self.cpu_s, 3),
            "loadgen_cpu_share": round(cpu_share, 3),
            "loadgen_saturated": cpu_share >= SATURATED_CPU_SHARE,
        }


def percentiles(sorted_values: Sequence[float]) -> dict[str, float | None]:
    """The router's own p50/p90/p99 (`app.percentile`), with the maximum instead of the count."""
    out = quantiles(sorted_values)
    del out["count"]
    out["max"] = round(sorted_values[-1], 3) if sorted_values else None
    return out


def chat_body(model: str, index: int, max_tokens: int, conversations: int) -> bytes:
    """A streaming chat request; the opening cycles over `conversations` distinct ones."""
    conversation = index % conversations
    return orjson.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [
                {"role": "system", "content": "You are a terse benchmark assistant."},
                {"role": "user", "content": f"Conversation {conversation}: say something."},
            ],
        }
    )


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> RequestResult:
    """Send one streaming request; TTFT is the arrival of the first non-empty content delta."""
    start = time.monotonic()
    ttft_s: float | None = None
    tokens = 0
    tail = b""
    error: str | None = None
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                return RequestResult(response.status, None, time.monotonic() - start, 0)
            async for chunk in response.content.iter_any():
                buffer = tail + chunk if tail else chunk
                end = buffer.rfind(EVENT_END)
                if end < 0:
                    tail = buffer
                    continue
                events, tail = buffer[: end + 2], buffer[end + 2 :]
                found = events.count(_CONTENT) - events.count(_EMPTY_CONTENT)
                if found:
                    if ttft_s is None:
                        ttft_s = time.monotonic() - start
                    tokens += found
                if _ERROR in events:
                    error = "error event in stream"
                if _DONE in events:
                    done = True
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = type(exc).__name__
    if error is None and not done:
        error = "stream ended before [DONE]"
    return RequestResult(200, ttft_s, time.monotonic() - start, tokens, error)


async def run_load(spec: LoadSpec, before_timed: Callable[[], None] | None = None) -> LoadResult:
    """Warm up (untimed), call `before_timed()`, then run the timed part on the same connections."""
    url = spec.base_url.rstrip("/") + CHAT_PATH
    headers = {"Content-Type": "application/json", **spec.headers}
    bodies = [
        chat_body(spec.model, i, spec.max_tokens, spec.conversations)
        for i in range(spec.conversations)
    ]
    results: list[RequestResult] = []
    sent = 0
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:
        if spec.warmup_per_worker:

            async def warm() -> None:
                for i in range(spec.warmup_per_worker):
                    await one_request(session, url, bodies[i % len(bodies)], headers)

            await asyncio.gather(*(warm() for _ in range(spec.concurrency)))
        if before_timed is not None:
            before_timed()
        cpu_start = _cpu_s()
        start = time.monotonic()
        deadline = start + spec.duration_s if spec.duration_s is not None else math.inf

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                if spec.requests is not None and sent >= spec.requests:
                    return
                index = sent
                sent += 1
                body = bodies[index % len(bodies)]
                results.append(await one_request(session, url, body, headers))

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        wall_s = time.monotonic() - start
        cpu_s = _cpu_s() - cpu_start
    return LoadResult(spec=spec, results=results, wall_s=wall_s, cpu_s=cpu_s)
