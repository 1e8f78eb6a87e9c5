"""Who holds which prefix: the `OwnershipStore` protocol, in memory and in Redis.

Records (both stores):
    conversation_key -> (backend, prompt tokens it has seen)   refreshed on use, idle TTL
    system_key       -> {backend: last used}                    the homes of a system prompt
A first claim is atomic (`SET NX` in Redis), so router replicas sharing one Redis agree on an owner.
In Redis both records of a request carry the system key as hash tag (`kvroute:{<system>}:c:<conv>`,
`kvroute:{<system>}:s`): one slot, so a look-up and a record stay one call on a Redis Cluster too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from app.config import redact_url
from app.looplag import LoopLag
from app.percentile import percentiles
from app.prefix import PrefixKeys
from app.redislink import (
    FALLBACK_CAUSES,
    FallbackCause,
    fallback_cause,
    next_batch,
    redis_deadline,
    redis_trouble,
    wall_cap_s,
    writer_deadline,
)
from app.redislink import redis_client as redis_client  # where callers have found it
from app.resp import ClusterLinks, LuaScript, reset_after_timeout
from app.routing import Ownership

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from app.resp import Command, Links, RespLink

log = logging.getLogger("kvroute.ownership")


MAX_SYSTEM_HOMES = 4
# Tries of one batch of records, each once Redis is due to be tried again: a failover (a few
# seconds, then `REDIS_RETRY_S`) is ridden out, a key Redis always refuses does not stall the rest.
WRITE_ATTEMPTS = 3
LOOKUP_SAMPLES = 4096  # look-up timings kept for /metrics
# A replica's published in-flight counts stand this long unless renewed: a dead replica's expire.
LOAD_LEASE_S = 1.0


# Where a request would open a new system prompt (`Dispatcher.first_home`): None when nowhere.
FirstHome = Callable[[], str | None]


class OwnershipStore(Protocol):
    async def lookup(self, keys: PrefixKeys, first_home: FirstHome | None = None) -> Ownership:
        """The conversation's owner and its system prompt's homes. A shared store that finds
        no home may make `first_home()` the home as it reads, so that replicas opening one new
        prompt at once agree on it; a store of one process has no one to agree with."""
        ...

    async def record(self, keys: PrefixKeys, backend: str, tokens: int, *, claim: bool) -> str:
        """Make `backend` the owner (or, with `claim`, only if there is none), holding `tokens` of
        the conversation (an estimate at dispatch, vLLM's exact figures once it answered)."""
        ...

    async def forget_backend(self, backend: str, since_s: float = 0.0) -> None:
        """Drop what `backend` held as of `since_s` seconds ago (it restarted since, or left):
        records made after that are of its new process, and stay."""
        ...

    async def run(self) -> None:
        """The store's background work, run by the app's lifespan (returns when there is none)."""
        ...

    def owned_counts(self) -> dict[str, int]: ...

    def describe(self) -> dict[str, object]: ...


@dataclass(slots=True)
class _Owner:
    backend: str
    tokens: int
    expires_s: float


class MemoryStore:
    """Process-local ownership with idle expiry and an LRU bound on the number of keys."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_keys: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        self._owners: OrderedDict[str, _Owner] = OrderedDict()
        self._systems: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._counts: dict[str, int] = {}

    def lookup_now(self, keys: PrefixKeys) -> Ownership:
        now = self._clock()
        self._expire(now)
        owner = self._owners.get(keys.conversation)
        holders = self._live_homes(keys.system, now)
        if owner is None:
            return Ownership(system_holders=holders)
        return Ownership(owner=owner.backend, owner_tokens=owner.tokens, system_holders=holders)

    async def lookup(self, keys: PrefixKeys, first_home: FirstHome | None = None) -> Ownership:
        return self.lookup_now(keys)

    def knows_home(self, system: str) -> bool:
        """Whether the system prompt has a home used within the TTL."""
        return bool(self._live_homes(system, self._clock()))

    def _live_homes(self, system: str, now: float) -> tuple[str, ...]:
        """The system prompt's homes not yet expired, the most recently used first."""
        homes = self._systems.get(system)
        if not homes:
            return ()
        live = [(t, b) for b, t in homes.items() if t > now]
        return tuple(b for _, b in sorted(live, reverse=True))

    def record_now(self, keys: PrefixKeys, backend: str, tokens: int, *, claim: bool) -> str:
        now = self._clock()
        expires = now + self.ttl_s
        current = self._owners.get(keys.conversation)
        if claim and current is not None and current.expires_s > now:
            return current.backend
        if current is not None:
            self._counts[current.backend] -= 1
        self._owners[keys.conversation] = _Owner(backend, tokens, expires)
        self._owners.move_to_end(keys.conversation)
        self._counts[backend] = self._counts.get(backend, 0) + 1
        homes = self._systems.setdefault(keys.system, {})
        homes[backend] = expires
        if len(homes) > MAX_SYSTEM_HOMES:
            del homes[min(homes, key=homes.__getitem__)]
        self._systems.move_to_end(keys.system)
        self._trim()
        return backend

    async def record(self, keys: PrefixKeys, backend: str, tokens: int, *, claim: bool) -> str:
        return self.record_now(keys, backend, tokens, claim=claim)

    async def forget_backend(self, backend: str, since_s: float = 0.0) -> None:
        # A record's expiry is its last write plus the TTL.
        before = self._clock() - since_s + self.ttl_s
        gone = [
            k for k, o in self._owners.items() if o.backend == backend and o.expires_s <= before
        ]
        for key in gone:
            del self._owners[key]
        if gone:
            self._counts[backend] -= len(gone)
        for homes in self._systems.values():
            if homes.get(backend, before) <= before:
                homes.pop(backend, None)

    async def run(self) -> None:
        return None

    def owned_counts(self) -> dict[str, int]:
        return {b: n for b, n in self._counts.items() if n > 0}

    def describe(self) -> dict[str, object]:
        return {"kind": "memory", "keys": len(self._owners), "system_keys": len(self._systems)}

    def _expire(self, now: float) -> None:
        # Refreshed keys move to the end, so expired ones gather at the front.
        while self._owners:
            key, owner = next(iter(self._owners.items()))
            if owner.expires_s > now:
                break
            del self._owners[key]
            self._counts[owner.backend] -= 1
        while self._systems:
            key, homes = next(iter(self._systems.items()))
            if max(homes.values(), default=0.0) > now:
                break
            del self._systems[key]

    def _trim(self) -> None:
        while len(self._owners) > self.max_keys:
            _, owner = self._owners.popitem(last=False)
            self._counts[owner.backend] -= 1
        while len(self._systems) > self.max_keys:
            self._systems.popitem(last=False)


# Record one use: claim the conversation key (only if free when `claim`), else take it over;
# add the backend to the system prompt's homes; refresh both TTLs. Returns the owner record.
_RECORD_SCRIPT = """
local value = ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[5]
local owner = value
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[3]) then
    owner = redis.call('GET', KEYS[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
else
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return owner
"""


# A look-up that may claim a first home: the owner and the system prompt's homes, as GET and
# HGETALL give them; when no home was used within the TTL, ARGV[1] becomes one first. Redis runs
# scripts one at a time, so of the replicas opening one new system prompt at once, the first to
# arrive places it and the others read its choice.
_CLAIM_FIRST_HOME_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
local homes = redis.call('HGETALL', KEYS[2])
local oldest = tonumber(ARGV[2]) - tonumber(ARGV[3])
for i = 2, #homes, 2 do
  if (tonumber(homes[i]) or 0) > oldest then
    return {owner, homes}
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {owner, redis.call('HGETALL', KEYS[2])}
"""


def _parse_owner(value: object) -> tuple[str, int, int] | None:
    """`backend|tokens|claimed_ms` -> parts, or None for a missing or foreign value."""
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        return None
    parts = value.split("|")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def _as_dict(flat: object) -> dict[object, object]:
    """A RESP2 hash reply (`[field, value, ...]`), or the dict redis-py makes of HGETALL's."""
    if isinstance(flat, dict):
        return flat
    if not isinstance(flat, list):
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=False))


async def _listed(reply: Awaitable[object]) -> list[object]:
    """A script's array reply (the claim script's `{owner, homes}`)."""
    value = await reply
    return value if isinstance(value, list) else [None, []]


class RedisStore:
    """Ownership shared through Redis, with memory as the fallback and an optional read-through
    cache.

    On the request path: a look-up is one pipelined round trip, or none when the key was read in
    the last `cache_s` (off by default: a cached answer misses what another replica recorded
    since, a spill it made or the tokens its turn added, and replicas then spill more). Records
    are written by one background task in pipelined batches. When Redis errs, or leaves a look-up
    unanswered for `timeout_s` of a responsive event loop (our own saturated loop is not Redis's
    fault: see `redis_deadline`), that request is served from memory, the fallback is counted by
    cause, and Redis is tried again after `retry_s`. No request ever fails because of Redis.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        url: str,
        *,
        ttl_s: float,
        timeout_s: float,
        retry_s: float,
        cache_s: float = 0.0,
        prefix: str = "kvroute:",
        lag: LoopLag | None = None,
        links: Links | None = None,
        load_interval_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._redis = redis
        self._links = links  # the request path's lean links (`resp`); redis-py's pipeline if None
        self.url = url
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.cache_s = cache_s
        self.prefix = prefix
        self.cap_s = wall_cap_s(timeout_s)
        self.lag = lag or LoopLag()
        self._clock = clock
        self._wall_ms = wall_ms
        self.memory = MemoryStore(ttl_s, clock=clock)
        self._cache: OrderedDict[str, tuple[float, Ownership]] = OrderedDict()
        self._forgotten_ms: dict[str, int] = {}  # backend -> wall ms of its restart
        self._queue: asyncio.Queue[tuple[PrefixKeys, str, int, bool]] = asyncio.Queue(
            maxsize=100_000
        )
        self._trouble = redis_trouble()
        self.down_until = 0.0
        self.down_cause: FallbackCause = "other"
        self.fallback_causes: dict[FallbackCause, int] = dict.fromkeys(FALLBACK_CAUSES, 0)
        self.errors = 0
        self.last_error = ""
        self.records_dropped = 0  # never written to Redis (the queue full, or Redis refusing)
        # Shared load: this replica's in-flight counts per backend, published when they change
        # (at most every `load_interval_s`) under a lease; the others' read with every look-up.
        self.replica = uuid.uuid4().hex[:12]
        self.load_key = f"{prefix}{{load}}"
        self.load_interval_s = load_interval_s
        self.load_lease_s = LOAD_LEASE_S
        self.load_changed = asyncio.Event()  # set by the pool's leases (`services`)
        self.local_in_flight: Callable[[], Mapping[str, int]] | None = None
        self.on_peer_load: Callable[[Mapping[str, float], float], None] | None = None
        self.peer_in_flight: dict[str, float] = {}
        self.peer_replicas = 0  # the other replicas whose lease was current at the last read
        self._stale_replicas: set[str] = set()
        self._topology_stale = asyncio.Event()
        if isinstance(links, ClusterLinks):  # its redirections (rate checks' too) heal the map
            links.on_redirect = self._topology_stale.set
        # The last look-ups' wall time, Redis's round trip and this router's own queue for its
        # loop: what sharing ownership adds to each request.
        self.lookup_ms: deque[float] = deque(maxlen=LOOKUP_SAMPLES)
        self._claim_script = LuaScript.of(_CLAIM_FIRST_HOME_SCRIPT)
        self.first_homes_proposed = 0  # look-ups that found no home and offered one

    @property
    def fallbacks(self) -> int:
        """Look-ups served from memory instead of Redis, whatever the cause."""
        return sum(self.fallback_causes.values())

    def redis_keys(self, keys: PrefixKeys) -> list[str]:
        """The conversation and system records, in one hash slot (the system key's tag)."""
        tagged = f"{self.prefix}{{{keys.system}}}:"
        return [tagged + "c:" + keys.conversation, tagged + "s"]

    # --- state ---------------------------------------------------------------------------
    def is_up(self) -> bool:
        return self._clock() >= self.down_until

    def state(self) -> str:
        """`up` once Redis answered since its last failure; `retrying` when it is due to be
        tried again and has not answered yet."""
        if self.down_until == 0.0:
            return "up"
        return "retrying" if self.is_up() else "down (serving from memory)"

    def _failed(self, exc: BaseException, during: str) -> None:
        was_up = self.down_until == 0.0
        self.errors += 1
        self.down_cause = fallback_cause(exc)
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.last_error += f" (during a {during})"
        self.down_until = self._clock() + self.retry_s
        if self.down_cause != "other":
            self._topology_stale.set()  # a cluster client re-reads the slots (see `heal`)
        if was_up:
            log.warning(
                "Redis at %s failed (%s, cause %s): ownership served from memory, retrying "
                "every %.0f s",
                redact_url(self.url),
                self.last_error,
                self.down_cause,
                self.retry_s,
            )

    def _succeeded(self) -> None:
        if self.down_until != 0.0:
            log.info("Redis at %s is back: ownership shared again", redact_url(self.url))
            self.down_until = 0.0

    def _from_memory(self, keys: PrefixKeys) -> Ownership:
        self.fallback_causes[self.down_cause] += 1
        return self.memory.lookup_now(keys)

    # --- OwnershipStore --------------------------------------------------------------------
    async def lookup(self, keys: PrefixKeys, first_home: FirstHome | None = None) -> Ownership:
        now = self._clock()
        if now < self.down_until:
            return self._from_memory(keys)
        cached = self._cache.get(keys.conversation)
        if cached is not None and cached[0] > now:
            # This replica's own records may be newer (a home another conversation of the same
            # system prompt opened here since): as for a fresh read, they are added.
            return self._with_local(keys, cached[1])
        conversation_key, system_key = self.redis_keys(keys)
        # Asked only when this replica knows no home: most look-ups of a new prompt's burst
        # after the first find the home this replica recorded, and read as before.
        proposal = None
        if first_home is not None and not self.memory.knows_home(keys.system):
            proposal = first_home()
            self.first_homes_proposed += proposal is not None
        started = time.perf_counter()  # (uvloop's loop time moves in whole ms)
        used: list[RespLink] = []
        try:
            async with redis_deadline(self.timeout_s, self.lag, self.cap_s):
                owner_value, homes, *load = await self._read(
                    conversation_key, system_key, used, proposal
                )
        except self._trouble as exc:  # serve from memory
            reset_after_timeout(used, exc, "a look-up")
            self._failed(exc, "look-up")
            return self._from_memory(keys)
        self.lookup_ms.append((time.perf_counter() - started) * 1000)
        self._succeeded()
        if load:
            self._read_peer_load(load[0])
        ownership = self._with_local(keys, self._ownership(owner_value, homes))
        self._remember(keys.conversation, ownership, now)
        return ownership

    async def _read(
        self, conversation_key: str, system_key: str, used: list[RespLink], proposal: str | None
    ) -> list[object]:
        """The owner, the system prompt's homes (a dict; with a `proposal`, claimed as the first
        home if there is none) and, with shared load, the replicas' load (this replica's own sent
        with it when it changed): one round trip (two at once on a cluster, where the load lives
        on another node). The lean links it used go in `used`, a MOVED's too."""
        claim_args = (proposal, self._wall_ms(), self.ttl_ms) if proposal is not None else None
        in_flight = self.local_in_flight  # (None: load is not shared)
        # This replica's counts, when they changed since they were last published, go with the
        # read of the others': in a burst each replica then sees the others' decisions (a first
        # home proposed, held in flight meanwhile, among them) at its next look-up, not a
        # publisher's cycle later. Unsent (the look-up failed or was cancelled), they are the
        # publisher's again.
        load_commands: list[Command] = []
        if in_flight is not None:
            load_commands.append(("HGETALL", self.load_key))
            if self.load_changed.is_set():
                self.load_changed.clear()
                load_commands[:0] = self._load_update(in_flight())
        try:
            return await self._send_read(
                conversation_key, system_key, used, claim_args, load_commands
            )
        except BaseException:
            if len(load_commands) > 1:
                self.load_changed.set()
            raise

    async def _send_read(
        self,
        conversation_key: str,
        system_key: str,
        used: list[RespLink],
        claim_args: tuple[str, int, int] | None,
        load_commands: list[Command],
    ) -> list[object]:
        keys = [conversation_key, system_key]
        if self._links is None:
            async with self._redis.pipeline(transaction=False) as pipe:
                if claim_args is None:
                    pipe.get(conversation_key)
                    pipe.hgetall(system_key)
                else:
                    pipe.eval(self._claim_script.text, 2, *keys, *claim_args)
                for command in load_commands:
                    pipe.execute_command(*command)
                replies = list(await pipe.execute())
            if claim_args is not None:
                replies[:1] = replies[0]
            shared = [_as_dict(replies[-1])] if load_commands else []
            return [replies[0], _as_dict(replies[1]), *shared]
        here = await self._links.on(conversation_key)
        read: Awaitable[list[object]]
        if claim_args is not None:
            read = _listed(here.run_script(self._claim_script, keys, claim_args, used=used))
        else:
            read = here.execute([("GET", conversation_key), ("HGETALL", system_key)], used=used)
        if not load_commands:
            owner_value, homes = await read
            return [owner_value, _as_dict(homes)]
        there = await self._links.on(self.load_key)
        # Sent together, on one connection when one node holds both: one round trip.
        (owner_value, homes), replies = await asyncio.gather(
            read, there.execute(load_commands, used=used)
        )
        return [owner_value, _as_dict(homes), _as_dict(replies[-1])]

    def _with_local(self, keys: PrefixKeys, shared: Ownership) -> Ownership:
        """Redis's records plus what this replica recorded itself (memory holds every record it
        made): a home chosen a moment ago whose write is still queued, or one Redis lost. Redis
        decides the owner when it has one, since another replica may have moved it since."""
        local = self.memory.lookup_now(keys)
        extra = tuple(b for b in local.system_holders if b not in shared.system_holders)
        if not extra and (shared.owner is not None or local.owner is None):
            return shared  # nothing to add: the common case once the writer has caught up
        owner = shared if shared.owner is not None else local
        holders = (shared.system_holders + extra)[:MAX_SYSTEM_HOMES]
        return Ownership(owner.owner, owner.owner_tokens, holders)

    def _read_peer_load(self, fields: object) -> None:
        """Sum the other live replicas' in-flight counts per backend (`expires_ms|b0:3,b1:1`)."""
        if not isinstance(fields, dict):
            return
        now_ms = self._wall_ms()
        total: dict[str, float] = {}
        replicas = 0
        for raw_replica, raw_value in fields.items():
            replica = raw_replica.decode() if isinstance(raw_replica, bytes) else str(raw_replica)
            value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
            expires, _, counts = value.partition("|")
            if replica == self.replica or not expires.isdigit():
                continue
            if int(expires) < now_ms:  # its lease ran out: the replica is gone
                self._stale_replicas.add(replica)
                continue
            replicas += 1
            for pair in counts.split(",") if counts else ():
                backend, _, n = pair.partition(":")
                if n.isdigit():
                    total[backend] = total.get(backend, 0.0) + int(n)
        self.peer_in_flight = total
        self.peer_replicas = replicas
        if self.on_peer_load is not None:
            self.on_peer_load(total, self.load_lease_s)

    def _ownership(self, owner_value: object, homes: object) -> Ownership:
        holders: list[tuple[int, str]] = []
        # A home unused for the TTL is no home, as in memory: the hash's own TTL is refreshed by
        # every use of the system prompt, on any backend, so it would list it for ever.
        oldest_ms = self._wall_ms() - self.ttl_ms
        if isinstance(homes, dict):
            for raw_backend, raw_ms in homes.items():
                backend = (
                    raw_backend.decode() if isinstance(raw_backend, bytes) else str(raw_backend)
                )
                try:
                    ms = int(raw_ms)
                except ValueError:
                    continue
                if ms > self._forgotten_ms.get(backend, -1) and ms > oldest_ms:
                    holders.append((ms, backend))
        system_holders = tuple(b for _, b in sorted(holders, reverse=True)[:MAX_SYSTEM_HOMES])
        parsed = _parse_owner(owner_value)
        if parsed is None or parsed[2] <= self._forgotten_ms.get(parsed[0], -1):
            return Ownership(system_holders=system_holders)
        return Ownership(owner=parsed[0], owner_tokens=parsed[1], system_holders=system_holders)

    def _remember(self, conversation: str, ownership: Ownership, now: float) -> None:
        if self.cache_s <= 0:
            return  # (the cache is off)
        self._cache[conversation] = (now + self.cache_s, ownership)
        self._cache.move_to_end(conversation)
        while len(self._cache) > 100_000:
            self._cache.popitem(last=False)

    async def record(self, keys: PrefixKeys, backend: str, tokens: int, *, claim: bool) -> str:
        owner = self.memory.record_now(keys, backend, tokens, claim=claim)
        if self.cache_s > 0:  # (off by default: nothing to keep current)
            cached = self._cache.get(keys.conversation)
            holders = cached[1].system_holders if cached else ()
            if backend not in holders:
                holders = (backend, *holders)[:MAX_SYSTEM_HOMES]
            self._remember(
                keys.conversation,
                Ownership(owner=owner, owner_tokens=tokens, system_holders=holders),
                self._clock(),
            )
        try:
            self._queue.put_nowait((keys, backend, tokens, claim))
        except asyncio.QueueFull:  # memory already has it
            self.records_dropped += 1
        return owner

    async def run(self) -> None:
        """The writer, the load publisher and the cluster map's healer, for the app's lifetime
        (the loop-lag meter is the app's: `services.running`)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.write())
            group.create_task(self.share_load())
            group.create_task(self.heal())

    async def heal(self) -> None:
        """After a failure, have a cluster client re-read who serves which slots, off the request
        path. redis-py refreshes its map after a failed single command, but not after a failed
        pipeline (all our calls): without this, a promoted replica could go unseen for long."""
        nodes = getattr(self._redis, "nodes_manager", None)
        if nodes is None:
            return  # a single node: nothing to re-read
        while True:
            await self._topology_stale.wait()
            self._topology_stale.clear()
            with contextlib.suppress(*self._trouble):  # the next failure asks again
                async with redis_deadline(max(self.timeout_s * 20, 2.0), self.lag, self.cap_s * 2):
                    await nodes.initialize()
            await asyncio.sleep(min(self.retry_s, 1.0))  # at most once a second

    async def share_load(self) -> None:
        """Publish this replica's in-flight counts under a lease, so that a dead replica's
        counts expire on their own; drop the entries of replicas whose lease ran out.

        An update follows a change of the counts within `load_interval_s` (the others' view of
        this replica lags by that and a round trip, not by a fixed period: a stale count reads
        as load that is not there, and each replica then spills more than one process would),
        sooner when a look-up carries it first (`_read`), and renews the lease four times per
        lease when nothing changes."""
        while True:
            if self.local_in_flight is not None and self.is_up():
                await self._publish_load(self.local_in_flight())
            await asyncio.sleep(self.load_interval_s)  # changes meanwhile go in one update
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.load_lease_s / 4):
                    await self.load_changed.wait()
            self.load_changed.clear()

    def _load_update(self, in_flight: Mapping[str, int]) -> list[Command]:
        """This replica's counts under a fresh lease (`expires_ms|b0:3,b1:1`)."""
        counts = ",".join(f"{b}:{n}" for b, n in in_flight.items() if n > 0)
        lease_ms = int(self.load_lease_s * 1000)
        value = f"{self._wall_ms() + lease_ms}|{counts}"
        return [
            ("HSET", self.load_key, self.replica, value),
            ("PEXPIRE", self.load_key, lease_ms * 10),
        ]

    async def _publish_load(self, in_flight: Mapping[str, int]) -> None:
        stale, self._stale_replicas = self._stale_replicas, set()
        commands = self._load_update(in_flight)
        if stale:
            commands.append(("HDEL", self.load_key, *stale))
        used: list[RespLink] = []
        try:
            async with redis_deadline(max(self.timeout_s * 10, 1.0), self.lag, self.cap_s):
                if self._links is not None:  # (an update a change may ask for every few ms)
                    link = await self._links.on(self.load_key)
                    await link.execute(commands, used=used)
                else:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for command in commands:
                            pipe.execute_command(*command)
                        await pipe.execute()
        except self._trouble as exc:  # the others go on with the last scrape
            reset_after_timeout(used, exc, "a load update")
            self._failed(exc, "load update")

    async def write(self) -> None:
        """The writer: records go to Redis in pipelined batches, off the request path. While
        Redis is away a batch is held and written when it is back, so that replicas agree again
        on the conversations served from memory meanwhile. A batch Redis refuses `WRITE_ATTEMPTS`
        times (a long outage, a poisoned key) is dropped and counted; memory keeps it."""
        while True:
            batch = await next_batch(self._queue, 512)
            for _ in range(WRITE_ATTEMPTS):
                # Held until Redis is due to be tried again: a deadline a look-up's failure may
                # move later meanwhile, which no event marks.
                while (wait_s := self.down_until - self._clock()) > 0:  # noqa: ASYNC110
                    await asyncio.sleep(wait_s)
                try:
                    results = await self._write_batch(batch)
                except self._trouble as exc:
                    self._failed(exc, "write")
                    continue
                self._succeeded()
                self._follow_claims(batch, results)
                break
            else:
                self.records_dropped += len(batch)

    def _follow_claims(
        self, batch: list[tuple[PrefixKeys, str, int, bool]], results: list[object]
    ) -> None:
        for (keys, backend, _tokens, claim), result in zip(batch, results, strict=True):
            parsed = _parse_owner(result)
            if claim and parsed is not None and parsed[0] != backend:
                # Another replica claimed this conversation first: follow it.
                self.memory.record_now(keys, parsed[0], parsed[1], claim=False)
                self._cache.pop(keys.conversation, None)

    async def _write_batch(self, batch: list[tuple[PrefixKeys, str, int, bool]]) -> list[object]:
        async with (
            writer_deadline(self.timeout_s, self.lag, self.cap_s),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            for keys, backend, tokens, claim in batch:
                # EVAL, not EVALSHA: on a cluster each node (a promoted replica too) may lack
                # the script, and a pipeline cannot load it half-way.
                pipe.eval(
                    _RECORD_SCRIPT,
                    2,
                    *self.redis_keys(keys),
                    backend,
                    tokens,
                    self.ttl_ms,
                    "1" if claim else "0",
                    self._wall_ms(),
                )
            results: list[object] = await pipe.execute()
        return results

    async def forget_backend(self, backend: str, since_s: float = 0.0) -> None:
        restarted_ms = self._wall_ms() - int(since_s * 1000)
        self._forgotten_ms[backend] = max(restarted_ms, self._forgotten_ms.get(backend, -1))
        self._cache.clear()
        await self.memory.forget_backend(backend, since_s)

    def owned_counts(self) -> dict[str, int]:
        return self.memory.owned_counts()

    def describe(self) -> dict[str, object]:
        return {
            "kind": "redis",
            "url": redact_url(self.url),
            "cluster": type(self._redis).__name__ == "RedisCluster",
            "lookup_client": "redis-py" if self._links is None else "lean",
            "state": self.state(),
            "fallbacks": self.fallbacks,
            "fallback_causes": dict(self.fallback_causes),
            "errors": self.errors,
            "last_error": self.last_error or None,
            "cache_s": self.cache_s,
            "records_queued": self._queue.qsize(),
            "records_dropped": self.records_dropped,
            "lookup_ms": percentiles(self.lookup_ms),
            "first_homes_proposed": self.first_homes_proposed,
            "local_keys": self.memory.describe()["keys"],
            "replica": self.replica,
            "shared_load": self.local_in_flight is not None,
            "peer_in_flight": self.peer_in_flight,
            "peer_replicas": self.peer_replicas,
        }
