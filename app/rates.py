"""Per-tenant request and token rates: token buckets in memory, or in Redis so that every router
replica enforces one budget (both buckets of a tenant in one hash slot: `kvroute:rate:{<tenant>}:rpm`). A request is checked once, before admission; amounts are never
negative (a request cannot refill its tenant's allowance).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.errors import Overloaded
from app.looplag import LoopLag
from app.redislink import redis_deadline, redis_trouble

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster


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
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._redis = redis
        self._script = self._redis.register_script(_BUCKETS_SCRIPT)
        self._trouble = redis_trouble()
        self.rpm, self.tpm = rpm, tpm
        self.timeout_s = timeout_s
        self.cap_s = max(timeout_s * 40, 2.0)
        self.lag = lag or LoopLag()  # the app's, which runs it
        self.prefix = prefix
        self._wall_ms = wall_ms
        self.local = RateLimits(rpm, tpm)
        self.fallbacks = 0

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
        try:
            async with redis_deadline(self.timeout_s, self.lag, self.cap_s):
                waits = await self._script(
                    keys=self.redis_keys(tenant), args=[self._wall_ms(), self.rpm, self.tpm, tokens]
                )
        except self._trouble:  # Redis failed: this process's buckets decide
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
