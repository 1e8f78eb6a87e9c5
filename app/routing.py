"""Backend selection: policies are pure functions of (request, backends, ownership).

`StickyBounded` is the default: one cost for every candidate, no mode switches,

    cost(b) = w_prefill * (prompt_tokens - cached(b)) + w_load * load(b)
    load(b) = in-flight dispatched by this router + w_waiting * requests queued at b
              (in flight there, ours exact plus others' as last scraped, past b's learned
              capacity; vLLM's waiting count until that capacity is known)

where cached(b) is what b is believed to hold (the conversation's previous prompt if b owns the
conversation, else the system prompt if b holds it). A backend whose load would pass
max(load_cap_factor * mean in-flight, load_cap_floor) is not a candidate (bounded loads), and ties go to the
highest rendezvous hash of the conversation key, so adding or removing a backend moves few keys.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from app.backends import BackendView
from app.prefix import PrefixKeys

CacheOutcome = Literal["hit", "miss", "spill", "reassigned"]
Affinity = Literal["conversation", "system", "none"]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    keys: PrefixKeys
    prompt_tokens: int  # estimated
    system_tokens: int  # estimated


@dataclass(frozen=True, slots=True)
class Ownership:
    """What the ownership store knows about a request's keys."""

    owner: str | None = None  # backend that owns the conversation key
    owner_tokens: int = 0  # prompt tokens it has seen of this conversation
    system_holders: tuple[str, ...] = ()  # backends that hold the system prompt


NO_OWNERSHIP = Ownership()


@dataclass(frozen=True, slots=True)
class Decision:
    backend: str
    outcome: CacheOutcome
    affinity: Affinity
    cached_tokens: int  # the router's estimate of what `backend` holds for this request


@dataclass(frozen=True, slots=True)
class CostWeights:
    w_prefill: float = 1.0
    w_load: float = 32.0
    w_waiting: float = 2.0
    cap_factor: float = 2.0
    cap_floor: float = 16.0


class Policy(Protocol):
    """Picks one backend among `candidates` (healthy, serving the model, not yet tried)."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[BackendView], ownership: Ownership
    ) -> Decision: ...


def candidates_for(
    snapshot: Sequence[BackendView],
    model: str,
    exclude: frozenset[str] = frozenset(),
    max_in_flight: int = 0,
) -> list[BackendView]:
    """Healthy backends serving `model`, not yet tried, under their in-flight limit (0: none)."""
    return [
        b
        for b in snapshot
        if b.healthy
        and b.serves(model)
        and b.name not in exclude
        and not (max_in_flight and b.in_flight >= max_in_flight)
    ]


def rendezvous(key: str, backend: str) -> int:
    digest = hashlib.blake2b(f"{key}|{backend}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def outcome_for(
    ownership: Ownership, chosen: str, candidates: Sequence[BackendView]
) -> CacheOutcome:
    if ownership.owner is None:
        return "miss"
    if ownership.owner == chosen:
        return "hit"
    if any(b.name == ownership.owner for b in candidates):
        return "spill"
    return "reassigned"


def _affinity(ownership: Ownership, chosen: str) -> Affinity:
    if ownership.owner == chosen:
        return "conversation"
    if chosen in ownership.system_holders:
        return "system"
    return "none"


def _cached(request: RouteRequest, ownership: Ownership, backend: str) -> int:
    if ownership.owner == backend:
        return min(ownership.owner_tokens, request.prompt_tokens)
    if backend in ownership.system_holders:
        return min(request.system_tokens, request.prompt_tokens)
    return 0


class StickyBounded:
    def __init__(self, weights: CostWeights) -> None:
        self.weights = weights

    def load(self, backend: BackendView) -> float:
        """In-flight requests plus a weight per request queued ahead of a newcomer.

        Once the backend's capacity is known, the queue is what is in flight there past it: this
        router's own requests (exact, current) plus what others had there at the last scrape;
        before that, vLLM's own waiting count (sampled, lagging)."""
        if backend.capacity:
            queued = max(0.0, backend.in_flight + backend.others - backend.capacity)
        else:
            queued = int(backend.waiting)
        return backend.in_flight + self.weights.w_waiting * queued

    def choose(
        self, request: RouteRequest, candidates: Sequence[BackendView], ownership: Ownership
    ) -> Decision:
        w = self.weights
        # The cap bounds what this router dispatched (its traffic share); vLLM's waiting queue,
        # a sampled and lagging figure, only weighs in the cost.
        total = sum(b.in_flight for b in candidates)
        cap = max(w.cap_factor * (total + 1) / len(candidates), w.cap_floor)
        eligible = [b for b in candidates if b.in_flight + 1 <= cap]
        if not eligible:  # everyone is over the cap: the least loaded take it
            least = min(b.in_flight for b in candidates)
            eligible = [b for b in candidates if b.in_flight == least]
        cheapest = self._cheapest(request, eligible, ownership)
        # Ties go to the highest rendezvous hash; hashing only the tied keeps a decision over
        # hundreds of backends a few arithmetic steps per backend.
        key = request.keys.conversation
        chosen = (
            cheapest[0].name
            if len(cheapest) == 1
            else max(cheapest, key=lambda b: rendezvous(key, b.name)).name
        )
        return Decision(
            backend=chosen,
            outcome=outcome_for(ownership, chosen, candidates),
            affinity=_affinity(ownership, chosen),
            cached_tokens=_cached(request, ownership, chosen),
        )

    def _cheapest(
        self, request: RouteRequest, eligible: Sequence[BackendView], ownership: Ownership
    ) -> list[BackendView]:
        """The backends of least cost: only the owner and the system's homes hold anything, so
        every other backend's cost is the full prefill plus its load."""
        w = self.weights
        holders = {name: _cached(request, ownership, name) for name in ownership.system_holders}
        if ownership.owner is not None:
            holders[ownership.owner] = _cached(request, ownership, ownership.owner)
        full = w.w_prefill * request.prompt_tokens
        w_prefill, w_load, w_waiting = w.w_prefill, w.w_load, w.w_waiting
        best_cost = float("inf")
        best: list[BackendView] = []
        for backend in eligible:
            # self.load(backend), inlined: this loop is the whole cost of a decision.
            if backend.capacity:
                queued = backend.in_flight + backend.others - backend.capacity
                queued = queued if queued > 0 else 0.0
            else:
                queued = int(backend.waiting)
            load = backend.in_flight + w_waiting * queued
            cost = full + w_load * load
            if holders:
                cost -= w_prefill * holders.get(backend.name, 0)
            if cost < best_cost:
                best_cost, best = cost, [backend]
            elif cost == best_cost:
                best.append(backend)
        return best


class LeastLoaded:
    """Fewest in-flight requests; ties by rendezvous hash of the key (baseline policy)."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[BackendView], ownership: Ownership
    ) -> Decision:
        key = request.keys.conversation
        chosen = min(candidates, key=lambda b: (b.in_flight, -rendezvous(key, b.name))).name
        return Decision(
            backend=chosen,
            outcome=outcome_for(ownership, chosen, candidates),
            affinity=_affinity(ownership, chosen),
            cached_tokens=_cached(request, ownership, chosen),
        )


class RoundRobin:
    """Each backend in turn (baseline policy)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(
        self, request: RouteRequest, candidates: Sequence[BackendView], ownership: Ownership
    ) -> Decision:
        chosen = candidates[next(self._counter) % len(candidates)].name
        return Decision(
            backend=chosen,
            outcome=outcome_for(ownership, chosen, candidates),
            affinity=_affinity(ownership, chosen),
            cached_tokens=_cached(request, ownership, chosen),
        )


def make_policy(name: str, weights: CostWeights) -> Policy:
    if name == "sticky":
        return StickyBounded(weights)
    if name == "least_loaded":
        return LeastLoaded()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown routing policy {name!r}")
