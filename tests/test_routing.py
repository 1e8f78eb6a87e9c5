from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from app.backends import BackendPool, BackendView
from app.candidates import Candidates, Roster
from app.prefix import PrefixKeys
from app.routing import (
    NEAR_KEY,
    SCORE_ALL_UP_TO,
    CostWeights,
    LeastLoaded,
    Ownership,
    RoundRobin,
    RouteRequest,
    StickyBounded,
    scored_with_load,
)


def view(
    name: str,
    in_flight: int = 0,
    waiting: float = 0.0,
    healthy: bool = True,
    models: frozenset[str] = frozenset({"m"}),
    capacity: int | None = None,
) -> BackendView:
    return BackendView(
        name=name,
        url=f"http://{name}",
        healthy=healthy,
        models=models,
        in_flight=in_flight,
        waiting=waiting,
        running=0.0,
        kv_usage=0.0,
        capacity=capacity,
    )


def request(key: str = "k", prompt: int = 1000, system: int = 0) -> RouteRequest:
    keys = PrefixKeys(
        conversation=key, system="s", prompt_chars=prompt * 4, system_chars=system * 4
    )
    return RouteRequest(model="m", keys=keys, prompt_tokens=prompt, system_tokens=system)


POLICY = StickyBounded(
    CostWeights(w_prefill=1.0, w_load=256.0, w_waiting=2.0, cap_factor=1.25, cap_floor=4.0)
)


def test_owner_serves_its_key_while_not_overloaded() -> None:
    backends = [view("b0", 2), view("b1", 0), view("b2", 0)]
    d = POLICY.choose(request(), backends, Ownership(owner="b0", owner_tokens=900))
    assert (d.backend, d.outcome, d.affinity, d.cached_tokens) == ("b0", "hit", "conversation", 900)


def test_owner_over_the_cap_spills() -> None:
    backends = [view("b0", 10), view("b1", 1), view("b2", 1)]
    d = POLICY.choose(request(), backends, Ownership(owner="b0", owner_tokens=900))
    assert d.outcome == "spill"
    assert d.backend != "b0"


def test_gone_owner_is_reassigned() -> None:
    d = POLICY.choose(request(), [view("b1"), view("b2")], Ownership(owner="b0", owner_tokens=900))
    assert d.outcome == "reassigned"
    assert d.backend in {"b1", "b2"}
    assert d.cached_tokens == 0


def test_new_key_prefers_a_system_prompt_holder() -> None:
    backends = [view("b0", 1), view("b1", 0), view("b2", 0)]
    d = POLICY.choose(request(system=800), backends, Ownership(system_holders=("b0",)))
    assert (d.backend, d.outcome, d.affinity, d.cached_tokens) == ("b0", "miss", "system", 800)


def test_short_cached_prefix_does_not_beat_a_big_load_gap() -> None:
    # 100 cached tokens are worth less than 3 requests of load: one cost, no mode switch.
    backends = [view("b0", 3), view("b1", 0)]
    d = POLICY.choose(request(prompt=120), backends, Ownership(owner="b0", owner_tokens=100))
    assert d.backend == "b1"
    assert d.outcome == "spill"


def test_new_keys_spread_and_are_deterministic() -> None:
    backends = [view("b0"), view("b1"), view("b2")]
    picks = [POLICY.choose(request(key=f"k{i}"), backends, Ownership()).backend for i in range(300)]
    counts = Counter(picks)
    assert set(counts) == {"b0", "b1", "b2"}
    assert min(counts.values()) > 60
    again = [POLICY.choose(request(key=f"k{i}"), backends, Ownership()).backend for i in range(300)]
    assert picks == again


def test_new_conversations_on_a_new_system_prompt_agree_on_its_first_home() -> None:
    """Conversations opened at once on a system prompt nobody holds (on replicas that cannot see
    each other's choice yet) go to one backend when loads tie; without a system prompt, or once
    the prompt has a home, the conversation key decides as before."""
    backends = [view("b0"), view("b1"), view("b2")]

    def on_system(key: str, system: str, tokens: int) -> RouteRequest:
        r = request(key=key, system=tokens)
        return replace(r, keys=replace(r.keys, system=system))

    for system in ("s1", "s2", "s3", "s4"):
        homes = {
            POLICY.choose(on_system(f"{system}-k{i}", system, 600), backends, Ownership()).backend
            for i in range(40)
        }
        assert len(homes) == 1, (system, homes)
    firsts = {
        POLICY.choose(on_system("k", f"s{i}", 600), backends, Ownership()).backend
        for i in range(40)
    }
    assert firsts == {"b0", "b1", "b2"}  # system prompts still spread over the fleet
    without = Counter(
        POLICY.choose(on_system(f"k{i}", "same", 0), backends, Ownership()).backend
        for i in range(300)
    )
    assert min(without.values()) > 60
    held = Ownership(system_holders=("b1",))
    assert {
        POLICY.choose(on_system(f"k{i}", "s1", 600), [view("b0"), view("b2")], held).backend
        for i in range(60)
    } == {"b0", "b2"}  # its home gone from the candidates: conversations spread again


def test_removing_a_backend_moves_only_its_keys() -> None:
    three = [view("b0"), view("b1"), view("b2")]
    two = [view("b0"), view("b2")]
    before = {
        i: POLICY.choose(request(key=f"k{i}"), three, Ownership()).backend for i in range(300)
    }
    after = {i: POLICY.choose(request(key=f"k{i}"), two, Ownership()).backend for i in range(300)}
    moved = [i for i in before if before[i] != after[i]]
    assert all(before[i] == "b1" for i in moved)


def test_an_owner_that_keeps_less_is_worth_a_shorter_queue() -> None:
    """The owner's estimate is scaled by what it was measured to keep: an owner evicting its
    conversations loses one to an idle backend that a fully keeping one would hold."""
    policy = StickyBounded(CostWeights(w_load=32.0, cap_floor=100.0))
    heeding, ignoring = policy, StickyBounded(policy.weights, retention=False)
    owned = Ownership(owner="b0", owner_tokens=900, system_holders=("b0", "b1"))
    req = request(prompt=1000, system=300)
    # b0 is 10 requests busier than b1: 320 of cost against 900 - 300 tokens more cached.
    keeping = [replace(view("b0", 10), retention=0.99), view("b1", 0)]
    evicting = [replace(view("b0", 10), retention=0.6), view("b1", 0)]
    kept = heeding.choose(req, keeping, owned)
    # (what its answer's cached_tokens will be measured against: the tokens the owner saw)
    assert (kept.outcome, kept.cached_tokens, kept.owner_tokens) == ("hit", 900, 900)
    d = heeding.choose(req, evicting, owned)  # 900 * 0.6 = 540: 240 more than b1, under 320
    assert (d.backend, d.outcome, d.affinity, d.owner_tokens) == ("b1", "spill", "system", 0)
    assert ignoring.choose(req, evicting, owned).outcome == "hit"
    # Only the owner's estimate is scaled: a system prompt's holders are hot, kept blocks.
    new = Ownership(system_holders=("b0",))
    shunned = [replace(view("b0", 5), retention=0.1), view("b1", 0)]
    assert heeding.choose(request(prompt=1000, system=300), shunned, new).backend == "b0"


def test_waiting_queue_counts_as_load() -> None:
    backends = [view("b0", 0, waiting=5), view("b1", 1)]
    d = POLICY.choose(request(key="x"), backends, Ownership())
    assert d.backend == "b1"


def test_bounded_load_under_one_hot_key() -> None:
    # Everyone asks for keys owned by b0: the cap keeps b0 near the mean.
    loads = {"b0": 0, "b1": 0, "b2": 0}
    for _ in range(60):
        backends = [view(n, loads[n]) for n in loads]
        d = POLICY.choose(request(), backends, Ownership(owner="b0", owner_tokens=1000))
        loads[d.backend] += 1
    mean = sum(loads.values()) / 3
    assert loads["b0"] <= 1.25 * mean + 2
    assert loads["b0"] == max(loads.values())


def test_candidates_filter_health_model_and_tried() -> None:
    pool = BackendPool([f"http://10.0.0.{i}:8000" for i in range(4)], default_model="m")
    for backend in pool.backends:
        backend.healthy = backend.admitted = True
    pool.get("b1").healthy = False
    pool.get("b2").models = frozenset({"other"})
    assert [b.name for b in pool.candidates("m", frozenset({"b3"}))] == ["b0"]


@pytest.mark.parametrize("policy", [LeastLoaded(), RoundRobin()])
def test_baselines_report_outcomes(policy: LeastLoaded | RoundRobin) -> None:
    backends = [view("b0", 5), view("b1", 0)]
    d = policy.choose(request(), backends, Ownership(owner="b1", owner_tokens=10))
    assert d.backend in {"b0", "b1"}
    assert d.outcome == ("hit" if d.backend == "b1" else "spill")


def test_round_robin_cycles() -> None:
    rr = RoundRobin()
    backends = [view("b0"), view("b1"), view("b2")]
    assert [rr.choose(request(), backends, Ownership()).backend for _ in range(6)] == [
        "b0",
        "b1",
        "b2",
    ] * 2


def test_known_capacity_replaces_the_lagging_waiting_count() -> None:
    # vLLM said 6 waiting a moment ago, but this router has only 2 in flight on a backend that
    # runs 8 at once: nothing is queued there now, so the owner keeps its conversation.
    owner = view("b0", 2, waiting=6, capacity=8)
    assert POLICY.load(owner) == 2
    won = Ownership(owner="b0", owner_tokens=900)
    assert POLICY.choose(request(prompt=1000), [owner, view("b1", 0)], won).outcome == "hit"
    # The same view without a known capacity spills on the stale queue.
    stale = [view("b0", 2, waiting=6), view("b1", 0)]
    assert POLICY.choose(request(prompt=1000), stale, won).outcome == "spill"
    # Past its capacity, each request in flight beyond it counts as queued.
    assert POLICY.load(view("b0", 11, waiting=0, capacity=8)) == 11 + 2 * 3


def test_other_clients_load_counts_once_capacity_is_known() -> None:
    # 40 requests from elsewhere (another replica, direct clients) on a backend running 4.
    busy = replace(view("b1", 0, waiting=36, capacity=4), others=40)
    assert POLICY.load(busy) == 2 * 36
    d = POLICY.choose(request(key="new"), [view("b0", 2), busy], Ownership())
    assert d.backend == "b0"


def test_other_replicas_in_flight_weigh_as_our_own() -> None:
    """Below capacity too: two replicas each sending 3 to b0 must see b0 as one process would,
    6 in flight, and send a new conversation to b1 with 4 (before, each saw only its own 3)."""
    b0 = replace(view("b0", 3, capacity=8), others=3.0, peers=3.0)
    b1 = view("b1", 4, capacity=8)
    assert (POLICY.load(b0), POLICY.load(b1)) == (6, 4)
    assert POLICY.choose(request(key="new"), [b0, b1], Ownership()).backend == "b1"
    # Past capacity, the queue counts the peers' requests once more, as it does our own.
    assert POLICY.load(replace(b0, in_flight=7)) == 7 + 3 + 2 * 2


@dataclass
class Counted:
    """A backend that notes when a decision reads its load."""

    name: str
    load: int = 0
    reads: set[str] = field(default_factory=set)
    url: str = ""
    waiting: float = 0.0
    capacity: int | None = None
    others: float = 0.0
    peers: float = 0.0
    retention: float = 1.0

    @property
    def in_flight(self) -> int:
        self.reads.add(self.name)
        return self.load


def counted_fleet(n: int, reads: set[str]) -> Roster:
    return Roster(Counted(f"b{i}", load=i % 7, reads=reads) for i in range(n))


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_a_decision_over_a_large_fleet_reads_a_bounded_number_of_backends(n: int) -> None:
    reads: set[str] = set()
    roster = counted_fleet(n, reads)
    homes = Ownership(owner="b5", owner_tokens=900, system_holders=("b9", "b11"))
    for i, ownership in enumerate([Ownership(), homes, Ownership(system_holders=("b3",))]):
        reads.clear()
        d = POLICY.choose(request(key=f"k{i}", system=400), Candidates(roster), ownership)
        assert d.backend in {b.name for b in roster.members}
        assert len(reads) <= NEAR_KEY + 3  # the ring's neighbours, the owner, two homes
    scored, total, size = scored_with_load(request(), Candidates(roster), homes)
    assert len(scored) <= NEAR_KEY + 3
    assert (total, size) == (roster.in_flight, n)  # the mean is still the whole fleet's


def test_a_small_fleet_is_scored_whole() -> None:
    reads: set[str] = set()
    roster = counted_fleet(SCORE_ALL_UP_TO, reads)
    scored, total, size = scored_with_load(request(), Candidates(roster), Ownership())
    assert len(scored) == size == SCORE_ALL_UP_TO
    assert total == sum(i % 7 for i in range(SCORE_ALL_UP_TO))


def test_large_fleet_outcomes() -> None:
    fleet = [view(f"b{i}", 2) for i in range(256)]
    cands = Candidates(Roster(fleet))
    hit = POLICY.choose(request(), cands, Ownership(owner="b200", owner_tokens=900))
    assert (hit.backend, hit.outcome, hit.cached_tokens) == ("b200", "hit", 900)
    home = POLICY.choose(request(system=800), cands, Ownership(system_holders=("b17",)))
    assert (home.backend, home.outcome, home.affinity) == ("b17", "miss", "system")
    gone = POLICY.choose(request(), cands, Ownership(owner="b999", owner_tokens=900))
    assert gone.outcome == "reassigned"
    # The owner over the cap (mean 2, floor 4 at 1.25x): it spills to the least loaded nearby.
    fleet[200] = view("b200", 40)
    spilled = POLICY.choose(
        request(), Candidates(Roster(fleet)), Ownership(owner="b200", owner_tokens=900)
    )
    assert spilled.outcome == "spill"
    assert spilled.backend != "b200"


def test_large_fleet_new_keys_are_deterministic_and_spread() -> None:
    fleet = [view(f"b{i}") for i in range(64)]
    cands = Candidates(Roster(fleet))
    picks = [POLICY.choose(request(key=f"k{i}"), cands, Ownership()).backend for i in range(2000)]
    again = Candidates(Roster(list(fleet)))
    assert picks == [
        POLICY.choose(request(key=f"k{i}"), again, Ownership()).backend for i in range(2000)
    ]
    counts = Counter(picks)
    assert len(counts) == 64
    assert max(counts.values()) < 3 * 2000 / 64


def test_large_fleet_spreads_new_keys_to_the_least_loaded_nearby() -> None:
    # Every backend busy but b7: the keys whose neighbours include b7 all go there.
    fleet = [view(f"b{i}", 0 if i == 7 else 3) for i in range(64)]
    cands = Candidates(Roster(fleet))
    for i in range(200):
        key = f"k{i}"
        near = {b.name for b in cands.near(key, NEAR_KEY)}
        d = POLICY.choose(request(key=key), cands, Ownership())
        assert d.backend in near
        assert (d.backend == "b7") == ("b7" in near)


def test_large_fleet_never_picks_an_excluded_backend() -> None:
    fleet = [view(f"b{i}") for i in range(64)]
    roster = Roster(fleet)
    first = POLICY.choose(request(), Candidates(roster), Ownership()).backend
    retry = POLICY.choose(request(), Candidates(roster, frozenset({first})), Ownership())
    assert retry.backend != first
    owned = Ownership(owner=first, owner_tokens=900)
    moved = POLICY.choose(request(), Candidates(roster, frozenset({first})), owned)
    assert moved.outcome == "reassigned"
