"""Admission: in-flight limits, a bounded wait queue that is fair between tenants, and optional
per-tenant request/token rates.

A request gets a slot at once when the global and tenant limits allow it, a backend can take it
(`ready()`: not at its own limit, vLLM not queueing) and nobody is waiting ahead of it. Otherwise
it waits; waiters are served round-robin across tenants, so one tenant's burst cannot starve the
others. Past the queue's size or its wait, `Overloaded` (429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.errors import Overloaded

if TYPE_CHECKING:
    from redis.asyncio import Redis

Ready = Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Limits:
    max_in_flight: int = 0  # 0: no global limit
    max_in_flight_per_tenant: int = 0  # 0: no tenant limit
    max_queue: int = 1024  # requests waiting in the router, all tenants
    max_queue_per_tenant: int = 256
    queue_timeout_s: float = 30.0


@dataclass(slots=True)
class _Waiter:
    tenant: str
    ready: Ready
    future: asyncio.Future[None]
    since_s: float


@dataclass(slots=True)
class AdmissionStats:
    admitted: int = 0
    queued: int = 0  # admitted after a wait
    rejected: dict[str, int] = field(default_factory=dict)
    queue_ms_total: float = 0.0
    queue_ms_max: float = 0.0


class Slot:
    """A held admission slot; `release()` is idempotent."""

    __slots__ = ("_admission", "queue_ms", "tenant")

    def __init__(self, admission: Admission | None, tenant: str, queue_ms: float) -> None:
        self._admission = admission
        self.tenant = tenant
        self.queue_ms = queue_ms

    def release(self) -> None:
        if self._admission is not None:
            self._admission._give_back(self.tenant)
            self._admission = None


class Admission:
    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.in_flight = 0
        self.per_tenant: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.waiting = 0
        self.stats = AdmissionStats()
        self._ticker: asyncio.Task[None] | None = None

    # --- the gate ------------------------------------------------------------------------
    def _fits(self, tenant: str) -> bool:
        lim = self.limits
        if lim.max_in_flight and self.in_flight >= lim.max_in_flight:
            return False
        return not (
            lim.max_in_flight_per_tenant
            and self.per_tenant.get(tenant, 0) >= lim.max_in_flight_per_tenant
        )

    def _take(self, tenant: str) -> None:
        self.in_flight += 1
        self.per_tenant[tenant] = self.per_tenant.get(tenant, 0) + 1
        self.stats.admitted += 1

    def _give_back(self, tenant: str) -> None:
        self.in_flight -= 1
        left = self.per_tenant[tenant] - 1
        if left:
            self.per_tenant[tenant] = left
        else:
            del self.per_tenant[tenant]
        self.kick()

    def _reject(self, reason: str, message: str, retry_after_s: float) -> Overloaded:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return Overloaded(message, retry_after_s=retry_after_s)

    async def acquire(self, tenant: str, ready: Ready) -> Slot:
        """One in-flight slot for `tenant`, waiting in the fair queue if need be.

        The caller releases it on every path (a stream holds it until its last byte)."""
        start = self._clock()
        if not self.waiting and self._fits(tenant) and ready():
            self._take(tenant)
        else:
            await self._wait(tenant, ready, start)
        return Slot(self, tenant, (self._clock() - start) * 1000)

    async def _wait(self, tenant: str, ready: Ready, start: float) -> None:
        lim = self.limits
        if self.waiting >= lim.max_queue:
            raise self._reject(
                "queue_full", f"the router's queue is full ({lim.max_queue} waiting)", 1.0
            )
        queue = self._waiting.setdefault(tenant, deque())
        if len(queue) >= lim.max_queue_per_tenant:
            raise self._reject(
                "tenant_queue_full",
                f"tenant has {len(queue)} requests waiting (limit {lim.max_queue_per_tenant})",
                1.0,
            )
        waiter = _Waiter(tenant, ready, asyncio.get_running_loop().create_future(), start)
        queue.append(waiter)
        self.waiting += 1
        self._ensure_ticker()
        try:
            async with asyncio.timeout(lim.queue_timeout_s):
                await waiter.future
        except TimeoutError:
            raise self._reject(
                "queue_timeout",
                f"no backend capacity within {lim.queue_timeout_s:g} s; retry later",
                max(1.0, lim.queue_timeout_s / 4),
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give_back(tenant)  # granted just as the client left
            raise
        finally:
            granted = waiter.future.done() and not waiter.future.cancelled()
            if not granted:
                waiter.future.cancel()
                self._forget(waiter)
        waited_ms = (self._clock() - start) * 1000
        self.stats.queued += 1
        self.stats.queue_ms_total += waited_ms
        self.stats.queue_ms_max = max(self.stats.queue_ms_max, waited_ms)

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                del self._waiting[waiter.tenant]

    def kick(self) -> None:
        """Grant slots to waiters, one tenant at a time in turn, while capacity lasts."""
        progress = True
        while self.waiting and progress:
            progress = False
            for tenant in list(self._waiting):
                queue = self._waiting[tenant]
                head = queue[0]
                if not (self._fits(tenant) and head.ready()):
                    continue
                queue.popleft()
                self.waiting -= 1
                # Served tenants go to the back: round robin across tenants.
                del self._waiting[tenant]
                if queue:
                    self._waiting[tenant] = queue
                self._take(tenant)
                head.future.set_result(None)
                progress = True

    def _ensure_ticker(self) -> None:
        # Readiness also changes without a release (vLLM's queue drains): poll while anyone waits.
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while self.waiting:
            await asyncio.sleep(0.02)
            self.kick()

    def snapshot(self) -> dict[str, object]:
        s = self.stats
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "admitted": s.admitted,
            "admitted_after_wait": s.queued,
            "rejected": dict(s.rejected),
            "queue_ms_mean": round(s.queue_ms_total / s.queued, 3) if s.queued else 0.0,
            "queue_ms_max": round(s.queue_ms_max, 3),
            "limits": {
                "max_in_flight": self.limits.max_in_flight,
                "max_in_flight_per_tenant": self.limits.max_in_flight_per_tenant,
                "max_queue": self.limits.max_queue,
                "max_queue_per_tenant": self.limits.max_queue_per_tenant,
                "queue_timeout_s": self.limits.queue_timeout_s,
            },
        }


class TokenBucket:
    """A refilling bucket (capacity per minute); pure, the clock comes in as an argument."""

    __slots__ = ("level", "per_minute", "updated_s")

    def __init__(self, per_minute: float, now_s: float) -> None:
        self.per_minute = per_minute
        self.level = per_minute
        self.updated_s = now_s

    def take(self, amount: float, now_s: float) -> float:
        """Take `amount`; return 0 when granted, else the seconds until it would be."""
        self.level = min(
            self.per_minute, self.level + (now_s - self.updated_s) * self.per_minute / 60
        )
        self.updated_s = now_s
        if amount > self.per_minute:
            amount = self.per_minute  # one huge request may still pass once the bucket is full
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) * 60 / self.per_minute


class RateLimits:
    """Per-tenant requests-per-minute and tokens-per-minute buckets, in memory (one process)."""

    def __init__(
        self, rpm: float, tpm: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.rejected: dict[str, int] = {}  # by "rpm" / "tpm"

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def check(self, tenant: str, tokens: int) -> None:
        self.check_now(tenant, tokens)

    def check_now(self, tenant: str, tokens: int) -> None:
        """Raise Overloaded when the tenant is over its rate."""
        now = self._clock()
        for kind, per_minute, amount in (("rpm", self.rpm, 1), ("tpm", self.tpm, tokens)):
            if not per_minute:
                continue
            bucket = self._buckets.get((tenant, kind))
            if bucket is None:
                bucket = self._buckets[(tenant, kind)] = TokenBucket(per_minute, now)
            wait_s = bucket.take(amount, now)
            if wait_s:
                self.rejected[kind] = self.rejected.get(kind, 0) + 1
                raise Overloaded(
                    f"tenant is over its {kind.upper()} limit of {per_minute:g} per minute",
                    retry_after_s=wait_s,
                )


# Both buckets of one tenant in one round trip: refill, then take from each, all or nothing.
# KEYS: rpm bucket, tpm bucket. ARGV: now_ms, rpm, tpm, tokens. Returns wait ms per kind.
_BUCKETS_SCRIPT = """
local now = tonumber(ARGV[1])
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local amounts = {1, tonumber(ARGV[4])}
local levels = {}
local waits = {0, 0}
for i = 1, 2 do
  if limits[i] > 0 then
    local state = redis.call('HMGET', KEYS[i], 'level', 'ts')
    local level = tonumber(state[1]) or limits[i]
    local ts = tonumber(state[2]) or now
    level = math.min(limits[i], level + (now - ts) * limits[i] / 60000)
    local amount = math.min(amounts[i], limits[i])
    levels[i] = level
    if level < amount then
      waits[i] = math.ceil((amount - level) * 60000 / limits[i])
    end
  end
end
if waits[1] == 0 and waits[2] == 0 then
  for i = 1, 2 do
    if limits[i] > 0 then
      local amount = math.min(amounts[i], limits[i])
      redis.call('HSET', KEYS[i], 'level', levels[i] - amount, 'ts', now)
      redis.call('PEXPIRE', KEYS[i], 120000)
    end
  end
end
return waits
"""


class RedisRateLimits:
    """The same buckets kept in Redis, so that every router replica enforces one budget.

    When Redis fails or is slow, the check falls back to this process's own buckets (counted
    in `fallbacks`); a rate limit never fails a request because of Redis."""

    def __init__(
        self,
        redis: Redis,
        rpm: float,
        tpm: float,
        *,
        timeout_s: float,
        prefix: str = "kvroute:rate:",
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._redis = redis
        self._script = self._redis.register_script(_BUCKETS_SCRIPT)
        self.rpm, self.tpm = rpm, tpm
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._wall_ms = wall_ms
        self.local = RateLimits(rpm, tpm)
        self.fallbacks = 0

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    async def check(self, tenant: str, tokens: int) -> None:
        if not self.enabled:
            return
        keys = [f"{self.prefix}{tenant}:rpm", f"{self.prefix}{tenant}:tpm"]
        try:
            async with asyncio.timeout(self.timeout_s):
                waits = await self._script(
                    keys=keys, args=[self._wall_ms(), self.rpm, self.tpm, tokens]
                )
        except Exception:  # any Redis trouble: this process's buckets decide
            self.fallbacks += 1
            self.local.check_now(tenant, tokens)
            return
        for kind, per_minute, wait_ms in (("rpm", self.rpm, waits[0]), ("tpm", self.tpm, waits[1])):
            if int(wait_ms) > 0:
                self.local.rejected[kind] = self.local.rejected.get(kind, 0) + 1
                raise Overloaded(
                    f"tenant is over its {kind.upper()} limit of {per_minute:g} per minute",
                    retry_after_s=int(wait_ms) / 1000,
                )
