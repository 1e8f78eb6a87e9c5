"""Admission: in-flight limits and a bounded wait queue that is fair between tenants.

A request gets a slot at once when the global and tenant limits allow it, a backend can take it
(`ready()`: not at its own limit, vLLM not queueing) and nobody is waiting ahead of it. Otherwise
it waits; waiters are served round-robin across tenants, so one tenant's burst cannot starve the
others. Past the queue's size or its wait, `Overloaded` (429 with Retry-After).

`AdmissionQueue` is the whole state, sans-IO: each change (enter, enqueue, grant, expire, leave,
release) is one synchronous method, so a grant, a timeout and a cancellation are ordered and
exactly one of them decides a waiter's fate. `Admission` is the asyncio shell around it: a slot is
held by `async with admission.slot(...)`, and the shell's `run()` loop (owned by the app's
lifespan) grants on readiness changes and expires waiters past the queue timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.errors import Overloaded

Ready = Callable[[], bool]
WaiterState = Literal["queued", "granted", "expired", "gone"]
TICK_S = 0.02  # how often readiness and timeouts are checked while anyone waits


@dataclass(frozen=True, slots=True)
class Limits:
    max_in_flight: int = 0  # 0: no global limit
    max_in_flight_per_tenant: int = 0  # 0: no tenant limit
    max_queue: int = 1024  # requests waiting in the router, all tenants
    max_queue_per_tenant: int = 256
    queue_timeout_s: float = 30.0


@dataclass(eq=False, slots=True)
class Waiter:
    """A queued request. `state` moves once from "queued" to one of the other three."""

    tenant: str
    ready: Ready
    since_s: float
    state: WaiterState = "queued"
    wake: asyncio.Future[None] | None = None  # the shell's wake-up signal


@dataclass(slots=True)
class AdmissionStats:
    admitted: int = 0
    queued: int = 0  # admitted after a wait
    abandoned: int = 0  # waiters whose client left (or that were cancelled) before a grant
    rejected: dict[str, int] = field(default_factory=dict)
    queue_ms_total: float = 0.0
    queue_ms_max: float = 0.0


class AdmissionQueue:
    """Counts, the per-tenant queues and the round-robin order: every transition in one method."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.per_tenant: dict[str, int] = {}
        self.waiting = 0
        # Tenants in serving order; a tenant moves to the back when one of its waiters is served.
        self._queues: OrderedDict[str, deque[Waiter]] = OrderedDict()
        self.stats = AdmissionStats()

    def fits(self, tenant: str) -> bool:
        lim = self.limits
        if lim.max_in_flight and self.in_flight >= lim.max_in_flight:
            return False
        return not (
            lim.max_in_flight_per_tenant
            and self.per_tenant.get(tenant, 0) >= lim.max_in_flight_per_tenant
        )

    def try_enter(self, tenant: str, ready: Ready) -> bool:
        """Take a slot now when nobody waits ahead and the limits and a backend allow it."""
        if self.waiting or not self.fits(tenant) or not ready():
            return False
        self._take(tenant)
        return True

    def enqueue(self, tenant: str, ready: Ready, now_s: float) -> Waiter:
        """Queue a request, or raise Overloaded when the queue (or the tenant's share) is full."""
        lim = self.limits
        if self.waiting >= lim.max_queue:
            raise self._reject(
                "queue_full", f"the router's queue is full ({lim.max_queue} waiting)", 1.0
            )
        queue = self._queues.get(tenant)
        if queue is not None and len(queue) >= lim.max_queue_per_tenant:
            raise self._reject(
                "tenant_queue_full",
                f"tenant has {len(queue)} requests waiting (limit {lim.max_queue_per_tenant})",
                1.0,
            )
        waiter = Waiter(tenant, ready, now_s)
        if queue is None:
            queue = self._queues[tenant] = deque()
        queue.append(waiter)
        self.waiting += 1
        return waiter

    def grant_ready(self, now_s: float) -> list[Waiter]:
        """Grant slots to queued waiters, one tenant at a time in turn, while capacity lasts."""
        granted: list[Waiter] = []
        progress = True
        while self.waiting and progress:
            progress = False
            for tenant in list(self._queues):
                queue = self._queues[tenant]
                head = queue[0]
                if not (self.fits(tenant) and head.ready()):
                    continue
                self._dequeue(head)
                # Served tenants go to the back: round robin across tenants.
                if tenant in self._queues:
                    self._queues.move_to_end(tenant)
                head.state = "granted"
                self._take(tenant)
                waited_ms = max(0.0, now_s - head.since_s) * 1000
                self.stats.queued += 1
                self.stats.queue_ms_total += waited_ms
                self.stats.queue_ms_max = max(self.stats.queue_ms_max, waited_ms)
                granted.append(head)
                progress = True
        return granted

    def expire(self, now_s: float) -> list[Waiter]:
        """Waiters queued for longer than the queue timeout: out of the queue, each a 429."""
        deadline = now_s - self.limits.queue_timeout_s
        expired: list[Waiter] = []
        for queue in self._queues.values():  # each queue is in arrival order: look at its head
            for waiter in queue:
                if waiter.since_s > deadline:
                    break
                expired.append(waiter)
        for waiter in expired:
            self._dequeue(waiter)
            waiter.state = "expired"
            self.stats.rejected["queue_timeout"] = self.stats.rejected.get("queue_timeout", 0) + 1
        return expired

    def leave(self, waiter: Waiter) -> bool:
        """The waiter's request is gone (client left, cancelled). Returns whether it holds a slot
        (it was granted just before), which the caller must then release."""
        if waiter.state == "queued":
            self._dequeue(waiter)
            waiter.state = "gone"
            self.stats.abandoned += 1
            return False
        return waiter.state == "granted"

    def release(self, tenant: str) -> None:
        self.in_flight -= 1
        left = self.per_tenant[tenant] - 1
        if left:
            self.per_tenant[tenant] = left
        else:
            del self.per_tenant[tenant]

    def queued(self) -> list[Waiter]:
        return [w for q in self._queues.values() for w in q]

    def _take(self, tenant: str) -> None:
        self.in_flight += 1
        self.per_tenant[tenant] = self.per_tenant.get(tenant, 0) + 1
        self.stats.admitted += 1

    def _dequeue(self, waiter: Waiter) -> None:
        queue = self._queues[waiter.tenant]
        queue.remove(waiter)
        self.waiting -= 1
        if not queue:
            del self._queues[waiter.tenant]

    def _reject(self, reason: str, message: str, retry_after_s: float) -> Overloaded:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return Overloaded(message, retry_after_s=retry_after_s)


@dataclass(frozen=True, slots=True)
class Slot:
    tenant: str
    queue_ms: float


class SlotHold:
    """The `async with` of one slot: released on exit, whatever ends the block. (A class, not a
    generator: it is entered on every request.)"""

    __slots__ = ("_admission", "_ready", "_tenant")

    def __init__(self, admission: Admission, tenant: str, ready: Ready) -> None:
        self._admission, self._tenant, self._ready = admission, tenant, ready

    async def __aenter__(self) -> Slot:
        return await self._admission._enter(self._tenant, self._ready)

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission._release(self._tenant)


class Admission:
    """The asyncio side of `AdmissionQueue`: slots as context managers, waits as futures."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = AdmissionQueue(limits)
        self.limits = limits
        self._clock = clock
        self._someone_waits = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self.queue.in_flight

    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def stats(self) -> AdmissionStats:
        return self.queue.stats

    def slot(self, tenant: str, ready: Ready) -> SlotHold:
        """`async with admission.slot(tenant, ready) as slot:` holds one in-flight slot for the
        body; entering waits in the fair queue if need be (Overloaded past its size or timeout)."""
        return SlotHold(self, tenant, ready)

    async def _enter(self, tenant: str, ready: Ready) -> Slot:
        start = self._clock()
        if not self.queue.try_enter(tenant, ready):
            await self._wait(tenant, ready, start)
        return Slot(tenant, (self._clock() - start) * 1000)

    async def _wait(self, tenant: str, ready: Ready, start: float) -> None:
        waiter = self.queue.enqueue(tenant, ready, start)
        waiter.wake = asyncio.get_running_loop().create_future()
        self._someone_waits.set()
        try:
            await waiter.wake
        except BaseException:
            # Cancelled (the client left, shutdown): a slot granted meanwhile goes back.
            if self.queue.leave(waiter):
                self._release(tenant)
            raise
        if waiter.state == "expired":
            timeout = self.limits.queue_timeout_s
            raise Overloaded(
                f"no backend capacity within {timeout:g} s; retry later",
                retry_after_s=max(1.0, timeout / 4),
            )

    def _release(self, tenant: str) -> None:
        self.queue.release(tenant)
        if self.queue.waiting:
            self._wake(self.queue.grant_ready(self._clock()))

    def _wake(self, waiters: list[Waiter]) -> None:
        for waiter in waiters:
            # A waiter whose task was cancelled already has a done future; its `leave()` sees
            # the grant and releases the slot.
            if waiter.wake is not None and not waiter.wake.done():
                waiter.wake.set_result(None)

    def tick(self) -> None:
        """Grant what became ready without a release (vLLM's queue drained, a backend came
        back) and expire waiters past the queue timeout."""
        now = self._clock()
        self._wake(self.queue.grant_ready(now))
        self._wake(self.queue.expire(now))

    async def run(self) -> None:
        """Background loop for the lifespan: ticks every TICK_S while anyone waits."""
        while True:
            await self._someone_waits.wait()
            while self.queue.waiting:
                await asyncio.sleep(TICK_S)
                self.tick()
            self._someone_waits.clear()

    def snapshot(self) -> dict[str, object]:
        s = self.queue.stats
        return {
            "in_flight": self.queue.in_flight,
            "waiting": self.queue.waiting,
            "admitted": s.admitted,
            "admitted_after_wait": s.queued,
            "abandoned": s.abandoned,
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
