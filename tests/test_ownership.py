from __future__ import annotations

from app.ownership import MemoryStore
from app.prefix import PrefixKeys
from app.routing import Ownership


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def keys(conv: str, system: str = "s") -> PrefixKeys:
    return PrefixKeys(conversation=conv, system=system, prompt_chars=0, system_chars=0)


async def test_first_claim_wins_and_refresh_moves() -> None:
    store = MemoryStore(ttl_s=10)
    assert await store.record(keys("a"), "b0", 100, claim=True) == "b0"
    assert await store.record(keys("a"), "b1", 100, claim=True) == "b0"
    found = await store.lookup(keys("a"))
    assert (found.owner, found.owner_tokens) == ("b0", 100)
    assert await store.record(keys("a"), "b1", 200, claim=False) == "b1"
    assert store.owned_counts() == {"b1": 1}


async def test_idle_keys_expire_and_use_refreshes() -> None:
    clock = Clock()
    store = MemoryStore(ttl_s=10, clock=clock)
    await store.record(keys("a"), "b0", 1, claim=True)
    await store.record(keys("b", "s2"), "b1", 1, claim=True)
    clock.t += 8
    await store.record(keys("a"), "b0", 1, claim=False)  # refresh a only
    clock.t += 5
    assert (await store.lookup(keys("a"))).owner == "b0"
    assert (await store.lookup(keys("b", "s2"))).owner is None
    assert store.owned_counts() == {"b0": 1}
    clock.t += 11
    assert (await store.lookup(keys("a"))).owner is None
    assert (await store.lookup(keys("a"))).system_holders == ()


async def test_system_prompt_gets_several_homes() -> None:
    clock = Clock()
    store = MemoryStore(ttl_s=10, clock=clock)
    await store.record(keys("a"), "b0", 1, claim=True)
    clock.t += 1
    await store.record(keys("b"), "b1", 1, claim=True)
    found = await store.lookup(keys("c"))
    assert found.owner is None
    assert found.system_holders == ("b1", "b0")


async def test_forget_backend_drops_its_keys() -> None:
    store = MemoryStore(ttl_s=10)
    await store.record(keys("a"), "b0", 1, claim=True)
    await store.record(keys("b"), "b1", 1, claim=True)
    await store.forget_backend("b0")
    assert (await store.lookup(keys("a"))).owner is None
    assert (await store.lookup(keys("a"))).system_holders == ("b1",)
    assert store.owned_counts() == {"b1": 1}


async def test_a_restart_forgets_only_what_came_before_it() -> None:
    """Records written after the restart (before the router noticed it) are of the new process:
    they stay; older ones go, and their system homes with them."""
    now = [100.0]
    store = MemoryStore(ttl_s=600, clock=lambda: now[0])
    await store.record(keys("old", "s-old"), "b0", 1, claim=True)
    now[0] = 110.0
    await store.record(keys("new", "s-new"), "b0", 1, claim=True)
    now[0] = 112.0
    await store.forget_backend("b0", since_s=5.0)  # restarted at 107 at the earliest
    assert (await store.lookup(keys("old", "s-old"))) == Ownership()
    kept = await store.lookup(keys("new", "s-new"))
    assert (kept.owner, kept.system_holders) == ("b0", ("b0",))
    assert store.owned_counts() == {"b0": 1}


async def test_key_count_is_bounded() -> None:
    store = MemoryStore(ttl_s=10, max_keys=3)
    for i in range(10):
        await store.record(keys(f"k{i}", f"s{i}"), "b0", 1, claim=True)
    assert store.describe()["keys"] == 3
    assert store.owned_counts() == {"b0": 3}
    assert (await store.lookup(keys("k9", "s9"))).owner == "b0"


async def test_memory_never_asks_for_a_first_home() -> None:
    """One process has no replica to agree with: its dispatch records the home."""

    def never() -> str:
        raise AssertionError("asked")

    store = MemoryStore(60)
    assert await store.lookup(keys("new", "s-new"), never) == Ownership()
    assert not store.knows_home("s-new")
    await store.record(keys("new", "s-new"), "b1", 10, claim=True)
    assert store.knows_home("s-new")
