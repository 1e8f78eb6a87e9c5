from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.admission import TICK_S, Admission, AdmissionQueue, Limits, Slot, Waiter
from app.errors import Overloaded
from app.services import background


def always() -> bool:
    return True


@contextlib.asynccontextmanager
async def ticking(adm: Admission) -> AsyncIterator[Admission]:
    """The admission's background loop, as the app's lifespan runs it."""
    async with background([adm.run()]):
        yield adm


async def hold(adm: Admission, tenant: str, release: asyncio.Event, ready: object = always) -> Slot:
    async with adm.slot(tenant, ready) as slot:  # type: ignore[arg-type]
        await release.wait()
        return slot


async def test_grants_at_once_under_the_limits() -> None:
    adm = Admission(Limits(max_in_flight=2))
    async with adm.slot("t", always) as a, adm.slot("t", always) as b:
        assert (adm.in_flight, a.queue_ms < 5, b.queue_ms < 5) == (2, True, True)
    assert adm.in_flight == 0


async def test_waits_for_a_release_then_records_queue_time() -> None:
    adm = Admission(Limits(max_in_flight=1))
    release = asyncio.Event()
    holder = asyncio.create_task(hold(adm, "t", release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(adm, "t", asyncio.Event()))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert adm.waiting == 1
    release.set()
    await holder
    await asyncio.sleep(0)
    assert adm.in_flight == 1
    assert adm.waiting == 0
    assert adm.stats.queued == 1
    assert adm.stats.queue_ms_max >= 40
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.in_flight == 0


async def test_round_robin_between_tenants() -> None:
    adm = Admission(Limits(max_in_flight=1))
    order: list[str] = []
    release = asyncio.Event()
    held = asyncio.create_task(hold(adm, "flood", release))
    await asyncio.sleep(0)

    async def ask(tenant: str) -> None:
        async with adm.slot(tenant, always):
            order.append(tenant)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ask("flood")) for _ in range(6)]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(ask("quiet")))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(asyncio.gather(held, *tasks), 5)
    # The quiet tenant arrived last but is served second, not seventh.
    assert order.index("quiet") == 1
    assert (adm.in_flight, adm.waiting) == (0, 0)


async def test_tenant_limit_does_not_block_other_tenants() -> None:
    adm = Admission(Limits(max_in_flight_per_tenant=1))
    async with adm.slot("a", always):
        blocked = asyncio.create_task(hold(adm, "a", asyncio.Event()))
        async with adm.slot("b", always) as other:
            assert other.tenant == "b"
            assert not blocked.done()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
    assert (adm.in_flight, adm.waiting) == (0, 0)


async def test_readiness_gates_and_is_polled() -> None:
    adm = Admission(Limits())
    state = {"ready": False}
    async with ticking(adm):
        waiter = asyncio.create_task(hold(adm, "t", asyncio.Event(), lambda: state["ready"]))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert adm.waiting == 1
        state["ready"] = True  # e.g. vLLM's waiting queue drained: no release needed
        for _ in range(100):
            if adm.in_flight == 1:
                break
            await asyncio.sleep(TICK_S)
        assert (adm.in_flight, adm.waiting) == (1, 0)
        waiter.cancel()


async def test_full_queue_and_timeout_are_429s() -> None:
    adm = Admission(Limits(max_in_flight=1, max_queue=1, queue_timeout_s=0.1))
    async with ticking(adm), adm.slot("t", always):
        first = asyncio.create_task(hold(adm, "t", asyncio.Event()))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as full:
            async with adm.slot("u", always):
                pass
        assert full.value.status == 429
        assert "Retry-After" in full.value.headers()
        with pytest.raises(Overloaded, match="no backend capacity"):
            await first
        assert adm.waiting == 0
    assert adm.stats.rejected == {"queue_full": 1, "queue_timeout": 1}
    assert adm.in_flight == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    adm = Admission(Limits(max_in_flight=1))
    async with adm.slot("t", always):
        waiter = asyncio.create_task(hold(adm, "t", asyncio.Event()))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.waiting == 0
        assert adm.stats.abandoned == 1
    assert adm.in_flight == 0


async def test_grant_and_cancel_in_one_turn_give_the_slot_back() -> None:
    """The race behind the InvalidStateError: a waiter is granted by a release in the same
    event-loop turn in which its task is cancelled. The grant must not be lost or doubled."""
    adm = Admission(Limits(max_in_flight=1))
    release = asyncio.Event()
    holder = asyncio.create_task(hold(adm, "t", release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(adm, "t", asyncio.Event()))
    await asyncio.sleep(0)
    assert adm.waiting == 1
    waiter.cancel()  # the waiter's future is cancelled now; its task runs later
    release.set()
    await holder  # the release grants the (cancelled) waiter in the core
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (adm.in_flight, adm.waiting) == (0, 0)


async def test_grant_and_timeout_in_one_turn_keep_exactly_one_outcome() -> None:
    now = [0.0]
    adm = Admission(Limits(max_in_flight=1, queue_timeout_s=1.0), clock=lambda: now[0])
    release = asyncio.Event()
    holder = asyncio.create_task(hold(adm, "t", release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(adm, "t", asyncio.Event()))
    await asyncio.sleep(0)
    now[0] = 5.0
    release.set()
    await holder  # the release grants the waiter first...
    adm.tick()  # ...so the timeout that lands in the same turn finds nothing to expire
    await asyncio.sleep(0)
    assert not waiter.done()
    assert adm.in_flight == 1
    assert adm.stats.rejected == {}
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.in_flight == 0


# --- the core, as a state machine --------------------------------------------------------------
TENANTS = ("a", "b", "c")
PER_TENANT = 2


class AdmissionMachine(RuleBasedStateMachine):
    """Interleaves acquire, release, timeout, cancel and readiness on `AdmissionQueue` (the
    clock injected) and checks the counts after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits(
            max_in_flight=3, max_in_flight_per_tenant=PER_TENANT, max_queue=6,
            max_queue_per_tenant=3, queue_timeout_s=5.0,
        )  # fmt: skip
        self.core = AdmissionQueue(self.limits)
        self.now = 0.0
        self.is_ready = True
        self.held: list[str] = []  # tenants of slots held by running requests
        self.waiters: list[Waiter] = []  # every waiter ever queued
        self.settled: set[int] = set()  # granted waiters that woke (slot in `held`) or left
        self.step = 0
        self.last_grant: dict[str, int] = {}  # tenant -> step of its last grant (steps count
        # grants and enqueues, in order)
        self.enqueued: dict[int, int] = {}  # waiter -> step when it was queued

    def ready(self) -> bool:
        return self.is_ready

    def _grant(self) -> None:
        """A grant pass, with its fairness checked: it serves until nobody more can be served,
        tenants that could take more got grants within one of each other, and a tenant served
        before is not served first while another, queued since before that, could be."""
        servable = {
            w.tenant: w
            for w in self.core.queued()
            if self.is_ready and self.core.fits(w.tenant) and w.tenant not in self._seen(w)
        }
        grants = self.core.grant_ready(self.now)
        if grants:
            first = grants[0].tenant
            since = self.last_grant.get(first, -1)
            for tenant, head in servable.items():
                waited_through = self.enqueued[id(head)] < since
                served_since = self.last_grant.get(tenant, -1) > since
                assert tenant == first or not waited_through or served_since, (
                    f"{first} served again before {tenant}, queued since before"
                )
        for waiter in grants:
            self.step += 1
            self.last_grant[waiter.tenant] = self.step
        assert all(w.state == "granted" for w in grants)
        counts = {t: sum(1 for w in grants if w.tenant == t) for t in TENANTS}
        waiting = {w.tenant for w in self.core.queued()}
        for tenant in waiting:
            assert not (self.is_ready and self.core.fits(tenant)), "a servable waiter was left"
        open_tenants = [t for t in waiting if self.core.per_tenant.get(t, 0) < PER_TENANT]
        for t in open_tenants:
            for u in open_tenants:
                assert abs(counts[t] - counts[u]) <= 1, (counts, waiting)

    def _seen(self, waiter: Waiter) -> set[str]:
        """Tenants whose head is ahead of `waiter` (only the head of each queue counts)."""
        heads: dict[str, Waiter] = {}
        for w in self.core.queued():
            heads.setdefault(w.tenant, w)
        return set() if heads.get(waiter.tenant) is waiter else {waiter.tenant}

    def _pending(self) -> list[Waiter]:
        return [w for w in self.waiters if w.state == "granted" and id(w) not in self.settled]

    @rule(tenant=st.sampled_from(TENANTS))
    def acquire(self, tenant: str) -> None:
        queued_before = sum(1 for w in self.core.queued() if w.tenant == tenant)
        total_before = self.core.waiting
        if self.core.try_enter(tenant, self.ready):
            self.held.append(tenant)
            return
        try:
            waiter = self.core.enqueue(tenant, self.ready, self.now)
            self.waiters.append(waiter)
            self.step += 1
            self.enqueued[id(waiter)] = self.step
        except Overloaded:
            assert total_before >= 6 or queued_before >= 3

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0, max_value=10))
    def release(self, index: int) -> None:
        self.core.release(self.held.pop(index % len(self.held)))
        self._grant()

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._grant()
        for waiter in self.core.expire(self.now):
            assert waiter.state == "expired"
            assert self.now - waiter.since_s >= 5.0

    @rule(ready=st.booleans())
    def readiness(self, ready: bool) -> None:
        self.is_ready = ready

    @rule(index=st.integers(min_value=0, max_value=20))
    def cancel(self, index: int) -> None:
        """A queued or just-granted request is cancelled (client gone)."""
        live = [w for w in self.waiters if w.state == "queued"] + self._pending()
        if not live:
            return
        waiter = live[index % len(live)]
        if self.core.leave(waiter):  # granted just before: the slot goes back
            self.settled.add(id(waiter))
            self.core.release(waiter.tenant)
            self._grant()
        else:
            assert waiter.state == "gone"

    @rule(index=st.integers(min_value=0, max_value=20))
    def wake(self, index: int) -> None:
        """A granted waiter's task runs: it now holds its slot like any request."""
        pending = self._pending()
        if pending:
            waiter = pending[index % len(pending)]
            self.settled.add(id(waiter))
            self.held.append(waiter.tenant)

    @invariant()
    def counts_match_what_is_held_and_queued(self) -> None:
        assert self.core.in_flight == len(self.held) + len(self._pending())
        assert self.core.waiting == len(self.core.queued())
        assert self.core.waiting == sum(1 for w in self.waiters if w.state == "queued")
        assert 0 <= self.core.in_flight <= self.limits.max_in_flight
        assert all(0 < n <= PER_TENANT for n in self.core.per_tenant.values())
        assert sum(self.core.per_tenant.values()) == self.core.in_flight


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_core_serves_tenants_in_turn_when_slots_free_one_at_a_time() -> None:
    core = AdmissionQueue(Limits(max_in_flight=3))
    for tenant in ("c", "c", "b"):
        assert core.try_enter(tenant, always)
    queued = [core.enqueue(t, always, 0.0) for t in ("a", "a", "b")]
    order = []
    for tenant in ("c", "c", "b"):
        core.release(tenant)
        order += [w.tenant for w in core.grant_ready(0.0)]
    # One slot at a time: a, then b (queued since before a's grant), then a again.
    assert order == ["a", "b", "a"]
    assert all(w.state == "granted" for w in queued)
