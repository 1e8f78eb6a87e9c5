"""Per-second samples of the router's figures, kept in a small ring for the dashboard.

`SeriesRecorder.tick()` runs once a second (a background task of the app): it diffs the
cumulative counters against the previous tick, so a request costs nothing here beyond the
counters `RouterMetrics.record` keeps anyway. `sample_between` is the pure arithmetic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from app.backends import BackendPool
from app.metrics import RouterMetrics
from app.percentile import nearest_rank

SERIES_SECONDS = 300  # five minutes at one sample a second


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative counters at one instant."""

    requests: int
    prompt_tokens: int
    cached_tokens: int
    ttft_seen: int


@dataclass(frozen=True, slots=True)
class Sample:
    """The figures of one interval (about a second)."""

    time_s: float  # wall clock at the end of the interval
    rps: float
    cached_ratio: float | None  # cached / prompt tokens of the requests finished in the interval
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    in_flight: int
    kv_usage: tuple[tuple[str, float | None], ...]  # (backend, 0..1 from its vLLM /metrics)


def totals_of(metrics: RouterMetrics) -> Totals:
    return Totals(
        requests=sum(metrics.requests.values()),
        prompt_tokens=metrics.tokens["prompt"],
        cached_tokens=metrics.tokens["cached"],
        ttft_seen=metrics.ttft_seen,
    )


def sample_between(
    prev: Totals,
    cur: Totals,
    elapsed_s: float,
    new_ttft_ms: Sequence[float],
    *,
    time_s: float,
    in_flight: int,
    kv_usage: tuple[tuple[str, float | None], ...],
) -> Sample:
    prompt = cur.prompt_tokens - prev.prompt_tokens
    ordered = sorted(new_ttft_ms)
    p50, p99 = nearest_rank(ordered, 0.5), nearest_rank(ordered, 0.99)
    return Sample(
        time_s=time_s,
        rps=round((cur.requests - prev.requests) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        cached_ratio=round((cur.cached_tokens - prev.cached_tokens) / prompt, 4)
        if prompt > 0
        else None,
        ttft_p50_ms=round(p50, 3) if p50 is not None else None,
        ttft_p99_ms=round(p99, 3) if p99 is not None else None,
        in_flight=in_flight,
        kv_usage=kv_usage,
    )


class SeriesRecorder:
    """The ring of samples; `tick()` adds one, `run()` ticks every `interval_s`."""

    def __init__(
        self,
        metrics: RouterMetrics,
        pool: BackendPool,
        *,
        capacity: int = SERIES_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.pool = pool
        self.samples: deque[Sample] = deque(maxlen=capacity)
        self._clock = clock
        self._wall = wall
        self._last: tuple[float, Totals] | None = None

    def tick(self) -> Sample | None:
        """Sample the interval since the last tick (the first tick only sets the baseline)."""
        now = self._clock()
        cur = totals_of(self.metrics)
        last, self._last = self._last, (now, cur)
        if last is None:
            return None
        then, prev = last
        window = self.metrics.ttft_ms
        new = min(cur.ttft_seen - prev.ttft_seen, len(window))
        backends = self.pool.backends
        sample = sample_between(
            prev,
            cur,
            now - then,
            list(islice(window, len(window) - new, None)),
            time_s=self._wall(),
            in_flight=sum(b.in_flight for b in backends),
            kv_usage=tuple(
                (b.name, b.metrics.kv_usage if b.metrics is not None else None) for b in backends
            ),
        )
        self.samples.append(sample)
        return sample

    async def run(self, interval_s: float = 1.0) -> None:
        self.tick()
        while True:
            await asyncio.sleep(interval_s)
            self.tick()
