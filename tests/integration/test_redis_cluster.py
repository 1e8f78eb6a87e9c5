"""Ownership and tenant rates on a real Redis Cluster (3 masters, 3 replicas on loopback): stores
and router processes agree, one budget per tenant, and a master's failover costs no request."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from app.errors import Overloaded
from app.ownership import RedisStore, _parse_owner
from app.prefix import PrefixKeys
from app.rates import RedisRateLimits
from app.redislink import is_cluster, redis_client
from app.resp import ClusterLinks, links_for
from app.services import background
from harness.redis import PrivateRedisCluster
from tests.conftest import missing_service, running_simulators, wait_for
from tests.integration.router_process import RouterProcess
from tests.integration.test_locality import SIM, conversation, turn

pytestmark = pytest.mark.redis


def keys(conv: str, system: str) -> PrefixKeys:
    return PrefixKeys(conversation=conv, system=system, prompt_chars=0, system_chars=0)


@pytest.fixture(params=["lean", "redis-py"])
def lookup(request: pytest.FixtureRequest) -> str:
    """Each test runs on both request-path clients (REDIS_LOOKUP_CLIENT)."""
    return str(request.param)


def lean_links(client: RedisCluster, lookup: str) -> ClusterLinks | None:
    if lookup != "lean":
        return None
    links = links_for(client)
    assert isinstance(links, ClusterLinks)
    return links


def cluster_store(url: str, lookup: str) -> RedisStore:
    client = redis_client(url, 0.5, cluster=True)
    assert isinstance(client, RedisCluster)
    links = lean_links(client, lookup)
    return RedisStore(client, url, ttl_s=60, timeout_s=0.5, retry_s=0.2, cache_s=0.0, links=links)


@pytest.fixture
async def replicas(
    redis_cluster_url: str, lookup: str
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    a, b = cluster_store(redis_cluster_url, lookup), cluster_store(redis_cluster_url, lookup)
    async with background([a.run(), b.run()]):
        yield a, b


async def written(store: RedisStore, look: RedisStore, k: PrefixKeys, timeout_s: float = 5) -> str:
    """Wait until `look` sees an owner for `k` (the writer is asynchronous); that owner."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (owner := (await look.lookup(k)).owner) is None:
        assert loop.time() < deadline, f"{k.conversation} never reached Redis"
        await asyncio.sleep(0.01)
    return owner


def test_the_cluster_is_detected(redis_cluster_url: str) -> None:
    assert is_cluster(redis_cluster_url, "auto")


async def test_two_stores_agree_on_owners_across_shards(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    a, b = replicas
    run = uuid.uuid4().hex[:8]
    # Many system prompts: their tags spread the records over the three shards.
    wanted = {keys(f"{run}-c{i}", f"{run}-s{i}"): f"b{i % 3}" for i in range(30)}
    for k, backend in wanted.items():
        await a.record(k, backend, 100, claim=True)
    for k, backend in wanted.items():
        assert await written(a, b, k) == backend
        seen = await b.lookup(k)
        assert (seen.owner_tokens, seen.system_holders) == (100, (backend,))
    # A race for one new key: both end up following the same winner.
    race = keys(f"{run}-race", f"{run}-s0")
    await asyncio.gather(a.record(race, "b0", 1, claim=True), b.record(race, "b1", 1, claim=True))
    # Each sees its own claim until the writers have run; then both follow the one Redis kept.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        kept = _parse_owner(await a._redis.get(a.redis_keys(race)[0]))
        owners = ((await a.lookup(race)).owner, (await b.lookup(race)).owner)
        if kept is not None and owners == (kept[0], kept[0]):
            break
        assert loop.time() < deadline, (kept, owners)
        await asyncio.sleep(0.01)
    assert a.fallbacks == b.fallbacks == 0
    assert a.describe()["cluster"] is True


async def test_lean_links_reach_every_shard_and_share_load(redis_cluster_url: str) -> None:
    """On a cluster the look-up's records and the replicas' load live on different nodes: the
    lean links read both at once, one connection per node and no more."""
    a, b = cluster_store(redis_cluster_url, "lean"), cluster_store(redis_cluster_url, "lean")
    a.local_in_flight = lambda: {"b0": 2}
    b.local_in_flight = lambda: {"b1": 5}
    run = uuid.uuid4().hex[:8]
    async with background([a.run(), b.run()]):
        for i in range(12):
            await a.record(keys(f"{run}-c{i}", f"{run}-s{i}"), f"b{i % 3}", 10, claim=True)
        for i in range(12):
            assert await written(a, b, keys(f"{run}-c{i}", f"{run}-s{i}")) == f"b{i % 3}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while b.peer_in_flight != {"b0": 2.0}:
            assert loop.time() < deadline, b.peer_in_flight
            await b.lookup(keys(f"{run}-c0", f"{run}-s0"))
            await asyncio.sleep(0.02)
    links = b._links
    assert isinstance(links, ClusterLinks)
    assert 1 < len(links._links) <= len(b._redis.get_nodes())  # type: ignore[union-attr]
    assert a.fallbacks == b.fallbacks == 0


async def test_two_rate_limiters_share_one_budget(redis_cluster_url: str, lookup: str) -> None:
    clients = [redis_client(redis_cluster_url, 0.5, cluster=True) for _ in range(2)]
    assert all(isinstance(c, RedisCluster) for c in clients)
    limits = [
        RedisRateLimits(c, 3, 0, timeout_s=0.5, links=lean_links(c, lookup))  # type: ignore[arg-type]
        for c in clients
    ]
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await limits[0].check(tenant, 1)
    await limits[1].check(tenant, 1)
    await limits[0].check(tenant, 1)
    with pytest.raises(Overloaded, match="RPM"):
        await limits[1].check(tenant, 1)
    assert limits[0].fallbacks == limits[1].fallbacks == 0


def router_env(sims_urls: list[str], redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "BACKEND_URLS": ",".join(sims_urls),
        "SERVED_MODEL": "sim-model",
        "REDIS_URL": redis_url,  # REDIS_CLUSTER left to auto: the router asks the server
        **extra,
    }


def alternating_turns_agree(routers: list[RouterProcess], run: str, conversations: int) -> None:
    """Conversations whose turns alternate between the routers each stay on one backend."""
    for i in range(conversations):
        messages = conversation(i)
        messages[1]["content"] += run
        backends = []
        for t in range(4):
            stats = turn(routers[(i + t) % len(routers)].url, f"tenant{i % 4}-{run}", messages)
            backends.append(stats["backend"])
            if t:
                assert stats["cache_outcome"] == "hit", (i, t, stats)
            messages = [
                *messages,
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": f"turn {t}"},
            ]
        assert len(set(backends)) == 1, backends


def test_two_router_processes_agree_and_share_a_tenant_budget(
    redis_cluster_url: str, lookup: str
) -> None:
    run = uuid.uuid4().hex[:8]
    with running_simulators(3, **SIM) as sims:
        env = router_env(
            [s.url for s in sims],
            redis_cluster_url,
            TENANT_RPM="10",
            TRUST_TENANT_HEADERS="true",
            REDIS_LOOKUP_CLIENT=lookup,
        )
        routers = [RouterProcess(env).start(), RouterProcess(env).start()]
        try:
            for r in routers:
                ownership = httpx.get(f"{r.url}/metrics").json()["ownership"]
                assert (ownership["kind"], ownership["cluster"]) == ("redis", True)
            alternating_turns_agree(routers, run, conversations=2)  # 8 of each tenant's 10
            body = {
                "model": "sim-model",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            }
            statuses = [
                httpx.post(
                    f"{routers[n % 2].url}/v1/chat/completions",
                    json=body,
                    headers={"X-Tenant-ID": f"budget-{run}"},
                    timeout=10,
                ).status_code
                for n in range(14)
            ]
            assert statuses == [200] * 10 + [429] * 4  # one budget, whichever replica answers
            for r in routers:
                ownership = httpx.get(f"{r.url}/metrics").json()["ownership"]
                assert (ownership["state"], ownership["fallbacks"]) == ("up", 0), ownership
        finally:
            for r in routers:
                r.stop()


def back_on_every_shard(routers: list[RouterProcess]) -> bool:
    """Whether a round of requests on many system prompts (their slots on every shard) through
    each router is served with no fallback to memory: each router's slot map is whole again,
    which its `up` state alone does not show (it may have met only the healthy shards since)."""

    def fallbacks() -> list[int]:
        return [httpx.get(f"{r.url}/metrics").json()["ownership"]["fallbacks"] for r in routers]

    before = fallbacks()
    for r in routers:
        for s in range(24):
            body = {
                "model": "sim-model",
                "max_tokens": 1,
                "messages": [
                    {"role": "system", "content": f"probe {s}"},
                    {"role": "user", "content": "hi"},
                ],
            }
            response = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=10)
            assert response.status_code == 200, response.text
    return fallbacks() == before


def test_a_master_stopped_under_load_costs_no_request(lookup: str) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing_service("redis-server / redis-cli are not installed")
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def load(router: RouterProcess, n: int) -> None:
        client, i = httpx.Client(), 0
        while not stop.is_set():
            body = {
                "model": "sim-model",
                "max_tokens": 2,
                "stream": True,
                "messages": [
                    {"role": "system", "content": f"system {i % 11}"},  # tags on every shard
                    {"role": "user", "content": f"load {n} {i % 7}"},
                ],
            }
            try:
                url = f"{router.url}/v1/chat/completions"
                statuses[client.post(url, json=body, timeout=10).status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1
            i += 1

    def served_at_least(n: int) -> None:
        target = sum(statuses.values()) + n
        wait_for(lambda: sum(statuses.values()) >= target, timeout_s=60, interval_s=0.05)

    with PrivateRedisCluster() as cluster, running_simulators(3, **SIM) as sims:
        env = router_env(
            [s.url for s in sims], cluster.url, REDIS_RETRY_S="0.5", REDIS_LOOKUP_CLIENT=lookup
        )
        routers = [RouterProcess(env).start(), RouterProcess(env).start()]
        threads = [threading.Thread(target=load, args=(r, n)) for n, r in enumerate(routers * 2)]
        try:
            for t in threads:
                t.start()
            served_at_least(40)
            cluster.stop_master()
            served_at_least(40)
            cluster.wait_ok(timeout_s=30)  # the replica is promoted
            served_at_least(40)
            stop.set()  # the load has made its point; agreement is checked turn by turn
            for t in threads:
                t.join(timeout=30)
            # Back on the cluster: both routers up on every shard, and agreeing again.
            wait_for(lambda: back_on_every_shard(routers), timeout_s=30, interval_s=0.2)
            alternating_turns_agree(routers, uuid.uuid4().hex[:8], conversations=3)
            causes = [
                httpx.get(f"{r.url}/metrics").json()["ownership"]["fallback_causes"]
                for r in routers
            ]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            for r in routers:
                r.stop()
    assert set(statuses) == {200}, statuses
    # Whatever the routers saw while the shard was away was counted, under a named cause.
    assert all(set(c) == {"timeout", "connection", "cluster", "other"} for c in causes), causes


def node_ids(url: str) -> dict[tuple[str, int], str]:
    """The masters' addresses and ids (`CLUSTER NODES` from the node `url` names, as redis-py
    parses it)."""
    import redis

    nodes: dict[str, dict[str, str]] = redis.Redis.from_url(url).execute_command(  # type: ignore[no-untyped-call]
        "CLUSTER NODES"
    )
    out = {}
    for address, node in nodes.items():
        if "master" in node["flags"]:
            host, _, port = address.split("@")[0].rpartition(":")
            out[(host, int(port))] = node["node_id"]
    return out


def move_empty_slot(slot: int, source: tuple[str, int], target: tuple[str, int], url: str) -> None:
    """Reshard one slot holding no keys: the four SETSLOT steps of a migration."""
    import redis

    ids = node_ids(url)
    src, dst = redis.Redis(*source), redis.Redis(*target)
    steps = [
        (dst, "IMPORTING", ids[source]),
        (src, "MIGRATING", ids[target]),
        (dst, "NODE", ids[target]),
        (src, "NODE", ids[target]),
    ]
    for node, state, node_id in steps:
        node.execute_command("CLUSTER", "SETSLOT", slot, state, node_id)  # type: ignore[no-untyped-call]


async def slot_and_another_master(
    store: RedisStore, k: PrefixKeys, url: str
) -> tuple[int, tuple[str, int], tuple[str, int]]:
    """The slot of `k`'s records, the master serving it and another one, after a look-up that
    has the store read the slot map and open its link to that master."""
    await store.lookup(k)
    client = store._redis
    assert isinstance(client, RedisCluster)
    conversation_key = store.redis_keys(k)[0]
    source = client.get_node_from_key(conversation_key)
    assert source is not None
    here = (source.host, int(source.port))
    there = next(a for a in node_ids(url) if a != here)
    return client.keyslot(conversation_key), here, there


async def test_a_resharded_slot_is_followed_without_a_fallback(redis_cluster_url: str) -> None:
    """A slot moved to another master after the router read the slot map: the lean links follow
    the MOVED (look-up and rate check), count no fallback, and have the map re-read."""
    import redis

    store = cluster_store(redis_cluster_url, "lean")
    client = store._redis
    assert isinstance(client, RedisCluster)
    limits = RedisRateLimits(client, 5, 0, timeout_s=0.5, links=store._links)
    k = keys(f"moved-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex)
    conversation_key = store.redis_keys(k)[0]
    slot, here, there = await slot_and_another_master(store, k, redis_cluster_url)
    move_empty_slot(slot, here, there, redis_cluster_url)
    moved = redis.Redis(*there)
    try:
        moved.set(conversation_key, f"b2|100|{int(time.time() * 1000)}")
        found = await store.lookup(k)
        assert (found.owner, found.owner_tokens) == ("b2", 100)
        await limits.check(k.system, 1)  # the tenant's buckets: the same tag, the same slot
        assert store.fallbacks == limits.fallbacks == 0, store.last_error
        assert store._topology_stale.is_set()  # the slot map is to be read again
    finally:
        moved.delete(conversation_key, *limits.redis_keys(k.system))
        move_empty_slot(slot, there, here, redis_cluster_url)
        await store._links.aclose()  # type: ignore[union-attr]


async def test_a_migrating_slot_is_read_where_each_key_is(redis_cluster_url: str) -> None:
    """A slot mid-migration (the steps of `redis-cli --cluster reshard`): the conversation's
    record has moved to the importing master, its system prompt's homes not yet. The lean
    look-up reads each where it is (following the ASK for the one that left) and falls back for
    neither that conversation nor a new one."""
    import redis

    store = cluster_store(redis_cluster_url, "lean")
    system = uuid.uuid4().hex
    k = keys(f"ask-{uuid.uuid4().hex[:8]}", system)
    conversation_key, system_key = store.redis_keys(k)
    slot, here, there = await slot_and_another_master(store, k, redis_cluster_url)
    ids = node_ids(redis_cluster_url)
    src, dst = redis.Redis(*here), redis.Redis(*there)
    now_ms = int(time.time() * 1000)
    src.set(conversation_key, f"b2|100|{now_ms}")
    src.hset(system_key, "b1", now_ms)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[here])  # type: ignore[no-untyped-call]
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[there])  # type: ignore[no-untyped-call]
    try:
        assert src.migrate(there[0], there[1], [conversation_key], 0, 5000) == b"OK"
        assert src.exists(system_key) == 1  # (asking for the key that left: an ASK)
        found = await store.lookup(k)
        assert (found.owner, found.owner_tokens) == ("b2", 100)
        assert "b1" in found.system_holders
        new = await store.lookup(keys("a-new-one", system))
        assert new.owner is None
        assert "b1" in new.system_holders
        assert store.fallbacks == 0, store.last_error
    finally:
        with dst.pipeline(transaction=False) as pipe:  # a key in an importing slot: ASKING
            pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            pipe.delete(conversation_key)
            pipe.execute()
        for node in (src, dst):
            node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")  # type: ignore[no-untyped-call]
        src.delete(system_key)
        await store._links.aclose()  # type: ignore[union-attr]
