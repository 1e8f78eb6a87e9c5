"""Which backends a request may go to, indexed so that a decision costs the same at 4 and 256.

A `Roster` holds the routable backends serving one model. The pool builds it when health,
models or membership change, not per request; its members are the live backends, whose load
is read when a decision is made. It indexes them by name and places each on a hash ring, so a
policy can look at a bounded shortlist: the key's owner and homes by name, plus the backends
next to the key on the ring (stable when backends come and go, as rendezvous hashing is).
`Candidates` is one request's view of a roster: less the backends already tried and those at
their in-flight limit.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, overload

RING_POINTS = 8  # places per backend on the ring: enough to spread a key's neighbours


class Candidate(Protocol):
    """What a policy reads of a backend: a `BackendView`, or the pool's live `Backend`."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> float: ...
    @property
    def capacity(self) -> int | None: ...
    @property
    def others(self) -> float: ...
    @property
    def peers(self) -> float: ...
    @property
    def retention(self) -> float: ...


@functools.lru_cache(maxsize=65536)
def ring_points(name: str) -> tuple[int, ...]:
    """A backend's places on the ring: they depend on its name only, so they are hashed once."""
    digest = hashlib.blake2b(name.encode(), digest_size=8 * RING_POINTS).digest()
    return tuple(int.from_bytes(digest[i : i + 8], "big") for i in range(0, len(digest), 8))


def key_point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Roster:
    """The routable backends of one model, in pool order, as of one pool epoch.

    `in_flight` is the members' total: computed once here, then kept by the pool's leases."""

    __slots__ = ("_ahead", "_ring", "_ring_members", "in_flight", "members", "positions")

    def __init__(self, members: Iterable[Candidate]) -> None:
        self.members: tuple[Candidate, ...] = tuple(members)
        self.positions = {b.name: i for i, b in enumerate(self.members)}
        self.in_flight = sum(b.in_flight for b in self.members)
        self._ring: list[int] = []  # sorted points, built on first use
        self._ring_members: list[int] = []  # the member (position) at each point
        # The first members from a ring point, by (point index, count): kept as keys land there.
        self._ahead: dict[tuple[int, int], tuple[Candidate, ...]] = {}

    def __len__(self) -> int:
        return len(self.members)

    def holds(self, backend: Candidate) -> bool:
        position = self.positions.get(backend.name)
        return position is not None and self.members[position] is backend

    def _start(self, key: str) -> int:
        if not self._ring:
            placed = sorted(
                (point, i) for i, b in enumerate(self.members) for point in ring_points(b.name)
            )
            self._ring = [point for point, _ in placed]
            self._ring_members = [i for _, i in placed]
        return bisect.bisect_left(self._ring, key_point(key)) % len(self._ring)

    def ring_from(self, key: str) -> Iterator[Candidate]:
        """Every member once, in ring order from the key's point: a deterministic order per key
        that a new or removed backend changes only around its own points."""
        return self._walk(self._start(key)) if self.members else iter(())

    def ahead(self, key: str, count: int) -> tuple[Candidate, ...]:
        """The first `count` members of `ring_from(key)`, remembered per ring point."""
        if not self.members:
            return ()
        start = self._start(key)
        found = self._ahead.get((start, count))
        if found is None:
            found = tuple(itertools.islice(self._walk(start), count))
            self._ahead[(start, count)] = found
        return found

    def _walk(self, start: int) -> Iterator[Candidate]:
        size = len(self._ring)
        seen: set[int] = set()
        for step in range(size):
            position = self._ring_members[(start + step) % size]
            if position not in seen:
                seen.add(position)
                yield self.members[position]
                if len(seen) == len(self.members):
                    return


class Candidates(Sequence[Candidate]):
    """A roster less the backends already tried and those at their in-flight limit (0: none).

    As a sequence it lists them all (built on first use, in pool order); `find`, `near` and
    `load_total` answer without visiting every member."""

    __slots__ = ("_listed", "exclude", "max_in_flight", "roster")

    def __init__(
        self, roster: Roster, exclude: frozenset[str] = frozenset(), max_in_flight: int = 0
    ) -> None:
        self.roster = roster
        self.exclude = exclude
        self.max_in_flight = max_in_flight
        self._listed: tuple[Candidate, ...] | None = None

    def admits(self, backend: Candidate) -> bool:
        if backend.name in self.exclude:
            return False
        return not (self.max_in_flight and backend.in_flight >= self.max_in_flight)

    def find(self, name: str) -> Candidate | None:
        position = self.roster.positions.get(name)
        if position is None:
            return None
        backend = self.roster.members[position]
        return backend if self.admits(backend) else None

    def near(self, key: str, count: int) -> list[Candidate]:
        """The first `count` candidates on the ring from the key's point."""
        ahead = self.roster.ahead(key, count)
        if not self.exclude and not self.max_in_flight:
            return list(ahead)
        found = [b for b in ahead if self.admits(b)]
        if len(found) == len(ahead):  # (the usual case: none of them excluded)
            return found
        found = []  # some are out: walk on past them
        for backend in self.roster.ring_from(key):
            if self.admits(backend):
                found.append(backend)
                if len(found) == count:
                    break
        return found

    def load_total(self) -> tuple[int, int]:
        """(in-flight requests, backends) over the roster less the excluded: the mean load the
        bounded-load cap scales. Backends at their limit count (finding them all is a scan)."""
        total, size = self.roster.in_flight, len(self.roster)
        for name in self.exclude:
            position = self.roster.positions.get(name)
            if position is not None:
                total -= self.roster.members[position].in_flight
                size -= 1
        return total, size

    def is_empty(self) -> bool:
        return not any(self.admits(b) for b in self.roster.members)

    def _list(self) -> tuple[Candidate, ...]:
        if self._listed is None:
            self._listed = tuple(b for b in self.roster.members if self.admits(b))
        return self._listed

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._list())

    @overload
    def __getitem__(self, index: int) -> Candidate: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Candidate]: ...
    def __getitem__(self, index: int | slice) -> Candidate | Sequence[Candidate]:
        return self._list()[index]


def as_candidates(candidates: Sequence[Candidate]) -> Candidates:
    """A policy's input as `Candidates`: the router passes them; a plain list gets indexed."""
    if isinstance(candidates, Candidates):
        return candidates
    return Candidates(Roster(candidates))
