from __future__ import annotations

import pytest

from app.backends import BackendView
from app.candidates import Candidates, Roster, as_candidates


def view(name: str, in_flight: int = 0) -> BackendView:
    return BackendView(
        name=name,
        url=f"http://{name}",
        healthy=True,
        models=frozenset({"m"}),
        in_flight=in_flight,
        waiting=0.0,
        running=0.0,
        kv_usage=0.0,
    )


def fleet(n: int) -> list[BackendView]:
    return [view(f"b{i}", in_flight=i % 5) for i in range(n)]


def names(backends: object) -> list[str]:
    assert isinstance(backends, list | tuple)
    return [b.name for b in backends]


def test_candidates_leave_out_the_tried_and_those_at_their_limit() -> None:
    roster = Roster([view("b0", 1), view("b1", 4), view("b2", 0), view("b3", 2)])
    cands = Candidates(roster, exclude=frozenset({"b2"}), max_in_flight=4)
    assert [b.name for b in cands] == ["b0", "b3"]
    assert len(cands) == 2
    assert cands[1].name == "b3"
    assert cands.find("b0") is roster.members[0]
    assert cands.find("b1") is None  # at its limit
    assert cands.find("b2") is None  # tried
    assert cands.find("b9") is None  # not in the roster
    assert not cands.is_empty()
    assert Candidates(roster, frozenset({"b0", "b1", "b2", "b3"})).is_empty()


def test_load_total_is_the_rosters_less_the_excluded() -> None:
    roster = Roster([view("b0", 1), view("b1", 4), view("b2", 3)])
    assert roster.in_flight == 8
    assert Candidates(roster).load_total() == (8, 3)
    assert Candidates(roster, frozenset({"b1", "gone"})).load_total() == (4, 2)


def test_a_plain_list_gets_indexed_and_candidates_pass_through() -> None:
    listed = as_candidates([view("b0"), view("b1")])
    assert [b.name for b in listed] == ["b0", "b1"]
    assert as_candidates(listed) is listed


@pytest.mark.parametrize("n", [1, 3, 40])
def test_the_ring_order_visits_every_member_once_the_same_way_per_key(n: int) -> None:
    roster = Roster(fleet(n))
    order = names(list(roster.ring_from("key-1")))
    assert sorted(order) == sorted(b.name for b in roster.members)
    assert names(list(Roster(fleet(n)).ring_from("key-1"))) == order
    assert names(list(roster.ahead("key-1", 4))) == order[:4]
    assert names(list(roster.ahead("key-1", 4))) == order[:4]  # (remembered)


def test_keys_start_at_different_places_on_the_ring() -> None:
    roster = Roster(fleet(40))
    firsts = {next(iter(roster.ring_from(f"k{i}"))).name for i in range(400)}
    assert len(firsts) > 30


def test_a_new_backend_moves_the_neighbours_of_few_keys() -> None:
    # Consistent hashing: with b40 added, a key's neighbours are the old ones with b40 slipped in.
    before, after = Roster(fleet(40)), Roster(fleet(41))
    changed = 0
    for i in range(500):
        old = names(list(before.ahead(f"k{i}", 8)))
        new = names(list(after.ahead(f"k{i}", 8)))
        if new != old:
            changed += 1
            assert [b for b in new if b != "b40"] == old[: len(new) - 1]
    assert changed < 500 * 0.4  # about 8/41 of the keys see it among their 8


def test_near_walks_past_the_excluded() -> None:
    roster = Roster(fleet(40))
    order = names(list(roster.ring_from("key")))
    assert names(Candidates(roster).near("key", 3)) == order[:3]
    skip = frozenset(order[:2])
    assert names(Candidates(roster, skip).near("key", 3)) == order[2:5]
    assert Candidates(Roster([])).near("key", 3) == []
    assert list(Roster([]).ring_from("key")) == []
