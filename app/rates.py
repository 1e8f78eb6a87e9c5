"""Per-tenant request and token rates: token buckets in memory, or in Redis so that every router
replica enforces one budget (both buckets of a tenant in one hash slot: `kvroute:rate:{<tenant>}:rpm`).
A request is checked once, before admission; amounts are never negative (a request cannot
refill its tenant's allowance). The token charge is what the request may use at most (its
prompt and its limit); when it ends, what it did not use is given back (`refund`), so the TPM
budget counts tokens used, while a request in flight still holds its whole allowance.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from app.errors import Overloaded
from app.looplag import LoopLag
from app.redislink import (
    next_batch,
    redis_deadline,
    redis_trouble,
    wall_cap_s,
    writer_deadline,
)
from app.resp import LuaScript, reset_after_timeout

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from app.resp import Links, RespLink


class TokenBucket:
    """A refilling bucket (capacity per minute); pure, the clock comes in as an argument."""

    __slots__ = ("level", "per_minute", "updated_s")

    def __init__(self, per_minute: float, now_s: float) -> None:
        self.per_minute = per_minute
        self.level = per_minute
        self.updated_s = now_s

    def wait(self, amount: float, now_s: float) -> float:
        """Seconds until `amount` could be taken (0: now); takes nothing."""
        self.level = min(
            self.per_minute, self.level + (now_s - self.updated_s) * self.per_minute / 60
        )
        self.updated_s = now_s
        amount = self._clamped(amount)
        return 0.0 if self.level >= amount else (amount - self.level) * 60 / self.per_minute

    def take(self, amount: float, now_s: float) -> float:
        """Take `amount`; return 0 when granted, else the seconds until it would be."""
        wait_s = self.wait(amount, now_s)
        if not wait_s:
            self.level -= self._clamped(amount)
        return wait_s

    def give(self, amount: float, now_s: float) -> float:
        """Give back `amount` taken earlier, never past the capacity; returns what went back."""
        self.wait(0, now_s)
        before = self.level
        self.level = min(self.per_minute, self.level + max(amount, 0.0))
        return self.level - before

    def _clamped(self, amount: float) -> float:
        # A negative amount would refill the bucket; one huge request may still pass once the
        # bucket is full.
        return min(max(amount, 0.0), self.per_minute)


# A bucket nobody touched for a minute has refilled: forgetting it changes no answer. Tenants are
# whatever clients send (up to MAX_TENANT_CHARS), so the map also has a hard bound (about 300
# bytes a bucket): past it the longest-idle bucket goes, which gives that tenant a fresh
# allowance early; only a flood of new tenants within a minute gets there.
REFILL_S = 60.0
MAX_BUCKETS = 200_000


class RateLimits:
    """Per-tenant requests-per-minute and tokens-per-minute buckets, in memory (one process),
    kept in the order of their last use so that the full ones are dropped from the front."""

    def __init__(
        self, rpm: float, tpm: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self.rejected: dict[str, int] = {}  # by "rpm" / "tpm"
        self.refunded = 0  # tokens given back, unused

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def __len__(self) -> int:
        return len(self._buckets)

    async def check(self, tenant: str, tokens: int) -> None:
        self.check_now(tenant, tokens)

    def check_now(self, tenant: str, tokens: int) -> None:
        """Raise Overloaded when the tenant is over its rate."""
        now = self._clock()
        buckets = self._buckets
        while buckets and now - next(iter(buckets.values())).updated_s >= REFILL_S:
            buckets.popitem(last=False)
        granted: list[tuple[TokenBucket, float]] = []
        for kind, per_minute, amount in (("rpm", self.rpm, 1), ("tpm", self.tpm, tokens)):
            if not per_minute:
                continue
            key = (tenant, kind)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = TokenBucket(per_minute, now)
                if len(buckets) > MAX_BUCKETS:
                    buckets.popitem(last=False)
            else:
                buckets.move_to_end(key)
            wait_s = bucket.wait(amount, now)
            if wait_s:
                self.rejected[kind] = self.rejected.get(kind, 0) + 1
                raise Overloaded(
                    f"tenant is over its {kind.upper()} limit of {per_minute:g} per minute",
                    retry_after_s=wait_s,
                )
            granted.append((bucket, amount))
        for bucket, taken in granted:  # all or nothing, as in Redis
            bucket.take(taken, now)

    def refund(self, tenant: str, tokens: int) -> None:
        """Give back tokens charged by `check` and not used. A bucket dropped meanwhile had
        refilled: nothing to give back to."""
        if tokens <= 0 or not self.tpm:
            return
        bucket = self._buckets.get((tenant, "tpm"))
        if bucket is not None:
            self.refunded += round(bucket.give(tokens, self._clock()))

    async def run(self) -> None:
        """Nothing to run in memory (the Redis limits write their refunds from here)."""

    def describe(self) -> dict[str, object]:
        return {"rpm": self.rpm, "tpm": self.tpm, "store": "memory", **self.counts()}

    def counts(self) -> dict[str, int]:
        return {"buckets": len(self._buckets), "refunded_tokens": self.refunded}


# Both buckets of one tenant in one round trip: refill, then take from each, all or nothing.
# KEYS: rpm bucket, tpm bucket. ARGV: now_ms, rpm, tpm, tokens. Returns wait ms per kind.
_BUCKETS_SCRIPT = """
local now = tonumber(ARGV[1])
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local amounts = {1, math.max(tonumber(ARGV[4]), 0)}
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

# Tokens given back to a tenant's TPM bucket, never past its limit. A bucket that expired had
# refilled. Its time stamp stays: refilling from it then adding is the same as adding then
# refilling, both capped. KEYS: tpm bucket. ARGV: tokens, tpm. Returns the tokens that went back.
_REFUND_SCRIPT = """
local level = tonumber(redis.call('HGET', KEYS[1], 'level'))
if not level then
  return 0
end
local after = math.min(tonumber(ARGV[2]), level + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'level', after)
return math.floor(after - level + 0.5)
"""
MAX_PENDING_REFUNDS = 8192  # past it a refund is dropped: its tenant keeps the charge


class RedisRateLimits:
    """The same buckets kept in Redis, so that every router replica enforces one budget.

    When Redis fails or is slow, the check falls back to this process's own buckets (counted
    in `fallbacks`); a rate limit never fails a request because of Redis."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        rpm: float,
        tpm: float,
        *,
        timeout_s: float,
        prefix: str = "kvroute:rate:",
        lag: LoopLag | None = None,
        links: Links | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._redis = redis
        self._script = self._redis.register_script(_BUCKETS_SCRIPT)
        self._links = links  # the request path's lean links (`resp`); redis-py's Script if None
        self._lean_script = LuaScript.of(_BUCKETS_SCRIPT)
        self._trouble = redis_trouble()
        self.rpm, self.tpm = rpm, tpm
        self.timeout_s = timeout_s
        self.cap_s = wall_cap_s(timeout_s)
        self.lag = lag or LoopLag()  # the app's, which runs it
        self.prefix = prefix
        self._wall_ms = wall_ms
        self.local = RateLimits(rpm, tpm)
        self.fallbacks = 0
        self._refunds: asyncio.Queue[tuple[str, int]] = asyncio.Queue(MAX_PENDING_REFUNDS)
        self.refunds_dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def redis_keys(self, tenant: str) -> list[str]:
        """The tenant's two buckets, in one hash slot (the tenant's tag; never an empty one,
        which would hash each whole key on its own)."""
        tagged = f"{self.prefix}{{{tenant or '-'}}}:"
        return [tagged + "rpm", tagged + "tpm"]

    async def check(self, tenant: str, tokens: int) -> None:
        if not self.enabled:
            return
        tokens = max(tokens, 0)
        waits: Any  # the script's two waits in ms
        used: list[RespLink] = []  # the lean links it waited on (a MOVED's too)
        try:
            async with redis_deadline(self.timeout_s, self.lag, self.cap_s):
                keys, args = self.redis_keys(tenant), [self._wall_ms(), self.rpm, self.tpm, tokens]
                if self._links is not None:
                    link = await self._links.on(keys[0])
                    waits = await link.run_script(self._lean_script, keys, args, used=used)
                else:
                    waits = await self._script(keys=keys, args=args)
        except self._trouble as exc:  # Redis failed: this process's buckets decide
            reset_after_timeout(used, exc, "a rate check")
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

    @property
    def refunded(self) -> int:
        return self.local.refunded

    def describe(self) -> dict[str, object]:
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "store": "redis",
            **self.local.counts(),  # the local fallback's buckets, and the refunds
            "refunds_pending": self._refunds.qsize(),
            "refunds_dropped": self.refunds_dropped,
            "fallbacks": self.fallbacks,
        }

    def refund(self, tenant: str, tokens: int) -> None:
        """Queue the give-back for the writer (`run`): off the request path, after its answer."""
        if tokens <= 0 or not self.tpm:
            return
        try:
            self._refunds.put_nowait((tenant, tokens))
        except asyncio.QueueFull:
            self.refunds_dropped += 1

    async def run(self) -> None:
        """The refund writer, for the app's lifetime: pipelined batches, one key per call."""
        while True:
            batch = await next_batch(self._refunds, 512)
            try:
                async with (
                    writer_deadline(self.timeout_s, self.lag, self.cap_s),
                    self._redis.pipeline(transaction=False) as pipe,
                ):
                    for tenant, tokens in batch:
                        # EVAL, as the ownership writer: a cluster node may lack the script.
                        pipe.eval(_REFUND_SCRIPT, 1, self.redis_keys(tenant)[1], tokens, self.tpm)
                    given = await pipe.execute()
            except self._trouble:  # Redis failed: the local buckets (its fallback) get them
                self.fallbacks += 1
                for tenant, tokens in batch:
                    self.local.refund(tenant, tokens)
                continue
            self.local.refunded += sum(int(n) for n in given)


class RatesCollector(Collector):
    """Tokens given back to tenants' TPM budgets, for Prometheus (refusals are in
    `kvroute_admission_rejections`)."""

    def __init__(self, rates: RateLimits | RedisRateLimits) -> None:
        self.rates = rates

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "kvroute_tpm_refunded_tokens",
            "Tokens charged to a tenant's TPM up front and given back unused after the answer",
            value=self.rates.refunded,
        )
