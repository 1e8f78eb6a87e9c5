"""The simulated vLLM engine: FIFO scheduling into `max_num_seqs` slots, prefix-cache pinning,
prefill and decode timing, and the counters behind /metrics and /sim/stats.

A request waits (counted as waiting) until a running slot and its KV blocks are free; then its
first token comes after `base_ttft_s + prefill_s_per_token * novel_tokens` and the others at
`decode_tokens_per_s`. Leaving a `session` by any exit frees the slot and unpins the blocks;
only a session marked finished counts as completed, any other exit as aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from app.simulator.cache import Allocation, BlockHash, PrefixCache
from app.simulator.config import SimConfig
from app.simulator.exposition import MetricsSnapshot
from app.simulator.prompt import (
    BYTES_PER_TOKEN,
    output_bytes_len,
    output_fragment,
    output_text,
    sequence_tail,
)
from app.simulator.protocol import SimRequest

Outcome = Literal[
    "queued", "running", "completed", "aborted", "dropped", "failed", "rejected", "unauthorized"
]
FINISHED_REASONS = ("abort", "error", "length", "repetition", "stop")


@dataclass(slots=True)
class RequestRecord:
    """One line of the /sim/stats request log; filled in as the request goes."""

    endpoint: str
    headers: dict[str, str]
    arrived_s: float  # monotonic
    id: str | None = None
    model: str | None = None
    stream: bool = False
    cache_salt: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    outcome: Outcome = "queued"
    queue_s: float | None = None
    ttft_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "model": self.model,
            "stream": self.stream,
            "cache_salt": self.cache_salt,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "max_tokens": self.max_tokens,
            "completion_tokens": self.completion_tokens,
            "status": self.status,
            "outcome": self.outcome,
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "headers": self.headers,
        }


@dataclass(slots=True)
class Counters:
    """Totals since start (or the last restart/reset)."""

    requests: dict[str, int] = field(
        default_factory=lambda: {"chat": 0, "completions": 0, "responses": 0}
    )
    completed: int = 0
    aborted: int = 0
    dropped: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED_REASONS, 0))


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[tuple[PrefixCache, Allocation]]
    hashes: list[BlockHash]
    num_tokens: int
    reserve_tokens: int


class Generation:
    """A running request: its cache hit and the tokens it emits."""

    def __init__(
        self, engine: Engine, request: SimRequest, allocation: Allocation, record: RequestRecord
    ) -> None:
        self.request = request
        self.allocation = allocation
        self.record = record
        self.emitted = 0
        self.finished = False
        self.dropped = False
        self._engine = engine

    @property
    def cached_tokens(self) -> int:
        return self.allocation.cached_tokens

    @property
    def created_tokens(self) -> int:
        return self.allocation.created_tokens

    @property
    def ttft_s(self) -> float:
        config = self._engine.config
        if config.no_delay:
            return 0.0
        novel = len(self.request.prompt_tokens) - self.cached_tokens
        return config.base_ttft_s + config.prefill_s_per_token * novel

    async def tokens(self) -> AsyncGenerator[str, None]:
        """Prefill, then one text fragment per token at the decode rate."""
        engine = self._engine
        await asyncio.sleep(self.ttft_s)
        no_delay = engine.config.no_delay
        interval = 1.0 / engine.config.decode_tokens_per_s
        start = engine.clock()
        self.record.ttft_s = start - self.record.arrived_s
        for index in range(self.request.max_tokens):
            if index and no_delay:
                await asyncio.sleep(0)
            elif index:
                delay = start + index * interval - engine.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            self._emit(1)
            yield output_fragment(index)

    async def run_to_end(self) -> str:
        """Non-stream generation: one sleep for the whole request; returns the text."""
        engine = self._engine
        await asyncio.sleep(self.ttft_s)
        start = engine.clock()
        self.record.ttft_s = start - self.record.arrived_s
        total = self.request.max_tokens
        decode_s = (
            0.0 if engine.config.no_delay else (total - 1) / engine.config.decode_tokens_per_s
        )
        try:
            await asyncio.sleep(decode_s)
        except asyncio.CancelledError:
            elapsed = engine.clock() - start
            self._emit(min(total, 1 + int(elapsed * engine.config.decode_tokens_per_s)))
            raise
        self._emit(total)
        return output_text(total)

    def finish(self) -> None:
        """Mark the request completed (finish_reason "length")."""
        self.finished = True

    def drop(self) -> None:
        """Mark the request as cut off by the server (a failure mode), not by the client."""
        self.dropped = True

    def _emit(self, count: int) -> None:
        self.emitted += count
        self.record.completion_tokens = self.emitted
        self._engine.counters.generation_tokens += count


class Engine:
    """Scheduler and state of one simulated engine; all of it lives in this object."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.cache = PrefixCache(config.block_size, config.capacity_blocks, seed=config.seed)
        self.counters = Counters()
        self.log: deque[RequestRecord] = deque(maxlen=config.log_size)
        self._running = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def new_record(self, endpoint: str, headers: dict[str, str]) -> RequestRecord:
        record = RequestRecord(endpoint=endpoint, headers=headers, arrived_s=self.clock())
        self.log.append(record)
        if endpoint in self.counters.requests:
            self.counters.requests[endpoint] += 1
        return record

    def clear(self) -> None:
        """Forget the KV cache, the counters and the log (a restart); in-flight work goes on."""
        self.cache = PrefixCache(
            self.config.block_size, self.config.capacity_blocks, seed=self.config.seed
        )
        self.counters = Counters()
        self.log.clear()

    @asynccontextmanager
    async def session(
        self, request: SimRequest, record: RequestRecord
    ) -> AsyncIterator[Generation]:
        """Wait for a slot and KV blocks, then hold them for the body of the `async with`."""
        block_size = self.config.block_size
        hashes = self.cache.block_hashes(request.prompt_tokens, salt=request.cache_salt)
        num_tokens = len(request.prompt_tokens)
        reserve = -(-output_bytes_len(request.max_tokens) // BYTES_PER_TOKEN) + 1
        record.prompt_tokens = num_tokens
        try:
            # The cache may be replaced by a restart while we wait: release into the one we got.
            cache, allocation = await self._admit(hashes, num_tokens, reserve)
        except asyncio.CancelledError:
            record.outcome = "aborted"
            self.counters.aborted += 1
            raise
        record.queue_s = self.clock() - record.arrived_s
        record.outcome = "running"
        record.cached_tokens = allocation.cached_tokens
        self.counters.prompt_tokens += num_tokens
        self.counters.cached_tokens += allocation.cached_tokens
        generation = Generation(self, request, allocation, record)
        try:
            yield generation
        finally:
            self._running -= 1
            full_blocks = len(hashes)
            tail = sequence_tail(
                request.prompt_tokens,
                request.prompt_bytes,
                output_text(generation.emitted),
                full_blocks * block_size,
            )
            parent = hashes[-1] if hashes else None
            extra = cache.block_hashes(tail, salt=request.cache_salt, parent=parent)
            cache.release(allocation, extra)
            if generation.finished:
                record.outcome = "completed"
                self.counters.completed += 1
                self.counters.finished["length"] += 1
            elif generation.dropped:
                record.outcome = "dropped"
                self.counters.dropped += 1
            else:
                record.outcome = "aborted"
                self.counters.aborted += 1
            self._pump()

    async def _admit(
        self, hashes: list[BlockHash], num_tokens: int, reserve: int
    ) -> tuple[PrefixCache, Allocation]:
        cache = self.cache
        if not self._waiters and self._running < self.config.max_num_seqs:
            allocation = cache.allocate(
                hashes, num_tokens, reserve_tokens=reserve, force=self._running == 0
            )
            if allocation is not None:
                self._running += 1
                return cache, allocation
        waiter = _Waiter(asyncio.get_running_loop().create_future(), hashes, num_tokens, reserve)
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted in the same loop turn as the cancel: give the slot back.
                self._running -= 1
                admitted_cache, allocation = waiter.future.result()
                admitted_cache.release(allocation)
                self._pump()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._pump()  # the next in line may fit where this one did not
            raise

    def _pump(self) -> None:
        """Admit waiting requests in FIFO order while slots and blocks allow."""
        cache = self.cache
        while self._waiters and self._running < self.config.max_num_seqs:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled, its task has not run yet
                self._waiters.popleft()
                continue
            allocation = cache.allocate(
                waiter.hashes,
                waiter.num_tokens,
                reserve_tokens=waiter.reserve_tokens,
                force=self._running == 0,
            )
            if allocation is None:
                return
            self._waiters.popleft()
            self._running += 1
            waiter.future.set_result((cache, allocation))

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        return {
            "requests": dict(counters.requests),
            "running": self._running,
            "waiting": self.waiting,
            "completed": counters.completed,
            "aborted": counters.aborted,
            "dropped": counters.dropped,
            "failed": counters.failed,
            "rejected": counters.rejected,
            "prompt_tokens_total": counters.prompt_tokens,
            "cached_tokens_total": counters.cached_tokens,
            "generation_tokens_total": counters.generation_tokens,
            "prefix_cache_queries": self.cache.queries,
            "prefix_cache_hits": self.cache.hits,
            "kv_cache_usage": self.cache.kv_usage(),
            "cached_blocks": self.cache.cached_blocks,
            "log": [record.to_json() for record in self.log],
        }

    def metrics_snapshot(self, start_time_s: float) -> MetricsSnapshot:
        return MetricsSnapshot(
            running=self._running,
            waiting=self.waiting,
            kv_usage=self.cache.kv_usage(),
            prefix_cache_queries=self.cache.queries,
            prefix_cache_hits=self.cache.hits,
            prompt_tokens=self.counters.prompt_tokens,
            generation_tokens=self.counters.generation_tokens,
            finished=dict(self.counters.finished),
            block_size=self.config.block_size,
            num_gpu_blocks=self.config.capacity_blocks,
            start_time_s=start_time_s,
        )
