"""Backend selection: policies are pure functions of (request, backends, ownership).

`StickyBounded` is the default: one cost for every candidate, no mode switches,

    cost(b) = w_prefill * (prompt_tokens - cached(b)) + w_load * load(b)
    load(b) = in-flight at b (this router's, exact, plus other replicas' shared counts)
              + w_waiting * requests queued at b
              (in flight there, ours exact plus others' as last scraped, past b's learned
              capacity; vLLM's waiting count until that capacity is known)

where cached(b) is what b is believed to hold: the conversation's previous prompt if b owns the
conversation, scaled by b's measured retention (the share of its conversations' earlier tokens it
still held when they came back: an owner evicting under KV pressure keeps less than it saw, so it
is not worth as long a queue), else the system prompt if b holds it. A backend whose load would pass
max(load_cap_factor * mean in-flight, load_cap_floor) is not a candidate (bounded loads), and ties go to the
highest rendezvous hash of the placement key, so adding or removing a backend moves few keys. The
placement key is the conversation key, except for the first conversations on a system prompt
nobody holds yet: there it is the system key, so that conversations opened at the same moment on
this router pick the same first home (replicas sharing Redis agree on it in the look-up with
`first_home_claim`: `RedisStore.lookup`).

A decision costs the same at 4 backends and at 256: a fleet of up to SCORE_ALL_UP_TO candidates is
scored whole; a larger one through a bounded shortlist (the owner and system homes by name, and
the backends next to the key on a hash ring, app/candidates.py), under the whole fleet's mean.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from app.candidates import Candidate, Candidates, as_candidates
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
    # Tokens of the conversation `backend` has seen (it owns it), else 0: what its answer's
    # cached_tokens is measured against (`BackendPool.note_cached`).
    owner_tokens: int = 0


@dataclass(frozen=True, slots=True)
class CostWeights:
    w_prefill: float = 1.0
    w_load: float = 32.0
    w_waiting: float = 2.0
    cap_factor: float = 2.0
    cap_floor: float = 16.0


class Policy(Protocol):
    """Picks one backend among `candidates` (healthy, serving the model, not yet tried): the
    router passes `Candidates`, indexed by name; tests may pass a plain list of views."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], ownership: Ownership
    ) -> Decision: ...


def rendezvous(key: str, backend: str) -> int:
    digest = hashlib.blake2b(f"{key}|{backend}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def outcome_for(ownership: Ownership, chosen: str, candidates: Candidates) -> CacheOutcome:
    if ownership.owner is None:
        return "miss"
    if ownership.owner == chosen:
        return "hit"
    if candidates.find(ownership.owner) is not None:
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


def _decision(
    request: RouteRequest, ownership: Ownership, chosen: str, candidates: Candidates
) -> Decision:
    return Decision(
        backend=chosen,
        outcome=outcome_for(ownership, chosen, candidates),
        affinity=_affinity(ownership, chosen),
        cached_tokens=_cached(request, ownership, chosen),
        owner_tokens=ownership.owner_tokens if ownership.owner == chosen else 0,
    )


# Up to this many candidates a decision scores them all; past it, a shortlist of the key's owner
# and system homes plus NEAR_KEY backends next to the key on the hash ring.
SCORE_ALL_UP_TO = 16
NEAR_KEY = 8


def placement_key(request: RouteRequest, ownership: Ownership) -> str:
    """The key that breaks ties and finds ring neighbours (see the module's docstring)."""
    if ownership.owner is None and not ownership.system_holders and request.system_tokens > 0:
        return request.keys.system
    return request.keys.conversation


def shortlist(
    request: RouteRequest, candidates: Candidates, ownership: Ownership
) -> list[Candidate]:
    """The candidates a decision over a large fleet scores: the owner and the system's homes
    (found by name) and the first NEAR_KEY backends on the ring from the placement key, whose
    least loaded wins a new key or takes a spill (the power of k choices)."""
    picked: dict[str, Candidate] = {}
    for name in (ownership.owner, *ownership.system_holders):
        backend = candidates.find(name) if name is not None else None
        if backend is not None:
            picked[backend.name] = backend
    for backend in candidates.near(placement_key(request, ownership), NEAR_KEY):
        picked.setdefault(backend.name, backend)
    return list(picked.values())


def scored_with_load(
    request: RouteRequest, candidates: Candidates, ownership: Ownership
) -> tuple[list[Candidate], int, int]:
    """The candidates to score, with the in-flight total and the backend count whose mean the
    bounded-load cap scales: every candidate of a fleet of up to SCORE_ALL_UP_TO; else the
    shortlist, and the fleet's total kept by the pool."""
    if len(candidates.roster) <= SCORE_ALL_UP_TO:
        scored = list(candidates)
        return scored, sum(b.in_flight for b in scored), len(scored)
    total, size = candidates.load_total()
    return shortlist(request, candidates, ownership), total, max(size, 1)


class StickyBounded:
    def __init__(self, weights: CostWeights, *, retention: bool = True) -> None:
        self.weights = weights
        self.retention = retention  # scale the owner's estimate by its measured retention

    def load(self, backend: Candidate) -> float:
        """In-flight requests plus a weight per request queued ahead of a newcomer.

        Once the backend's capacity is known, the queue is what is in flight there past it: this
        router's own requests (exact, current) plus what others had there at the last scrape;
        before that, vLLM's own waiting count (sampled, lagging)."""
        if backend.capacity:
            queued = max(0.0, backend.in_flight + backend.others - backend.capacity)
        else:
            queued = int(backend.waiting)
        return backend.in_flight + backend.peers + self.weights.w_waiting * queued

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], ownership: Ownership
    ) -> Decision:
        w = self.weights
        indexed = as_candidates(candidates)
        scored, total, size = scored_with_load(request, indexed, ownership)
        # The cap bounds what this router dispatched (its traffic share); vLLM's waiting queue,
        # a sampled and lagging figure, only weighs in the cost.
        cap = max(w.cap_factor * (total + 1) / size, w.cap_floor)
        eligible = [b for b in scored if b.in_flight + 1 <= cap]
        if not eligible:  # everyone is over the cap: the least loaded take it
            least = min(b.in_flight for b in scored)
            eligible = [b for b in scored if b.in_flight == least]
        cheapest = self._cheapest(request, eligible, ownership)
        # Ties go to the highest rendezvous hash; hashing only the tied keeps a decision a few
        # arithmetic steps per scored backend.
        if len(cheapest) == 1:
            chosen = cheapest[0].name
        else:
            key = placement_key(request, ownership)
            chosen = max(cheapest, key=lambda b: rendezvous(key, b.name)).name
        return _decision(request, ownership, chosen, indexed)

    def _cheapest(
        self, request: RouteRequest, eligible: Sequence[Candidate], ownership: Ownership
    ) -> list[Candidate]:
        """The backends of least cost: only the owner and the system's homes hold anything, so
        every other backend's cost is the full prefill plus its load."""
        w = self.weights
        holders: dict[str, float] = {
            name: _cached(request, ownership, name) for name in ownership.system_holders
        }
        # The holder whose estimate is scaled by its measured retention (none when that is off).
        discounted = ownership.owner if self.retention else None
        if ownership.owner is not None:
            holders[ownership.owner] = _cached(request, ownership, ownership.owner)
        full = w.w_prefill * request.prompt_tokens
        w_prefill, w_load, w_waiting = w.w_prefill, w.w_load, w.w_waiting
        best_cost = float("inf")
        best: list[Candidate] = []
        for backend in eligible:
            # self.load(backend), inlined: this loop is the whole cost of a decision.
            if backend.capacity:
                queued = backend.in_flight + backend.others - backend.capacity
                queued = queued if queued > 0 else 0.0
            else:
                queued = int(backend.waiting)
            load = backend.in_flight + backend.peers + w_waiting * queued
            cost = full + w_load * load
            if holders:
                held = holders.get(backend.name, 0)
                if backend.name == discounted:
                    held *= backend.retention
                cost -= w_prefill * held
            if cost < best_cost:
                best_cost, best = cost, [backend]
            elif cost == best_cost:
                best.append(backend)
        return best


class LeastLoaded:
    """Fewest in-flight requests; ties by rendezvous hash of the key (baseline policy)."""

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], ownership: Ownership
    ) -> Decision:
        key = request.keys.conversation
        least = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == least]  # (only the tied are hashed)
        chosen = max(tied, key=lambda b: rendezvous(key, b.name)).name
        return _decision(request, ownership, chosen, as_candidates(candidates))


class RoundRobin:
    """Each backend in turn (baseline policy)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(
        self, request: RouteRequest, candidates: Sequence[Candidate], ownership: Ownership
    ) -> Decision:
        chosen = candidates[next(self._counter) % len(candidates)].name
        return _decision(request, ownership, chosen, as_candidates(candidates))


def make_policy(name: str, weights: CostWeights, *, retention: bool = True) -> Policy:
    if name == "sticky":
        return StickyBounded(weights, retention=retention)
    if name == "least_loaded":
        return LeastLoaded()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown routing policy {name!r}")
