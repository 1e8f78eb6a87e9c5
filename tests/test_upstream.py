"""Dispatcher.first_home: the first home a shared store may claim, counted while it is asked."""

from __future__ import annotations

from app.backends import BackendPool
from app.ownership import MemoryStore
from app.prefix import PrefixKeys
from app.routing import NO_OWNERSHIP, CostWeights, RouteRequest, StickyBounded
from app.transport import MockRequest, MockResponse, MockTransport
from app.upstream import Dispatcher


def new_prompt(system: str, system_tokens: int = 2000) -> RouteRequest:
    keys = PrefixKeys(
        conversation=f"{system}-c", system=system, prompt_chars=10_000, system_chars=8000
    )
    return RouteRequest(model="m", keys=keys, prompt_tokens=2500, system_tokens=system_tokens)


async def answer(request: MockRequest) -> MockResponse:
    return MockResponse(status=200)


def dispatcher(backends: int) -> Dispatcher:
    pool = BackendPool([f"http://10.0.0.{i}:8000" for i in range(backends)], default_model="m")
    for backend in pool.backends:
        backend.healthy = backend.admitted = True
    weights = CostWeights(w_prefill=1.0, w_load=256.0, w_waiting=2.0, cap_factor=1.25)
    return Dispatcher(
        pool=pool,
        policy=StickyBounded(weights),
        ownership=MemoryStore(60),
        transport=MockTransport(answer),
        read_timeout_s=5,
        retries=0,
    )


def test_a_bursts_proposals_see_each_other_as_its_dispatches_would() -> None:
    """Three new prompts proposed while the others' look-ups still run: each proposal counts
    where it proposed, so the three go to three backends, not to the one their hashes favour."""
    d = dispatcher(3)
    # Prompts that each open on b0 when the fleet is idle.
    idle = d.pool.candidates("m")
    names = (f"s{i}" for i in range(1000))
    routes = [
        new_prompt(n)
        for n in names
        if d.policy.choose(new_prompt(n), idle, NO_OWNERSHIP).backend == "b0"
    ]
    with (
        d.first_home(routes[0]) as first,
        d.first_home(routes[1]) as second,
        d.first_home(routes[2]) as third,
    ):
        proposed = [first(), second(), third()]
        assert sorted(b.in_flight for b in d.pool.backends) == [1, 1, 1]
    assert sorted(proposed) == ["b0", "b1", "b2"], proposed  # type: ignore[type-var]
    # Released with the `with`, and never counted as dispatched.
    assert [(b.in_flight, b.dispatched) for b in d.pool.backends] == [(0, 0)] * 3
    assert d.pool.roster("m").in_flight == 0


def test_no_first_home_without_a_system_prompt_or_a_backend() -> None:
    d = dispatcher(2)
    with d.first_home(new_prompt("s", system_tokens=0)) as propose:
        assert propose() is None
    for backend in d.pool.backends:
        backend.healthy = False
    with d.first_home(new_prompt("s")) as propose:
        assert propose() is None
    assert [b.in_flight for b in d.pool.backends] == [0, 0]
