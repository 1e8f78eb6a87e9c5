"""What the router keeps for the Responses API: which backend holds each response, and (opt-in)
each conversation's items, so that a conversation survives losing that backend.

    response id -> (backend, wall ms recorded)          TTL; a record older than the backend's
                                                        last restart is "lost", not an owner
    (tenant, response id) -> one turn: previous id,     TTL; only with RESPONSES_HISTORY; a chain
        this turn's input and output items              longer than the size cap is not kept

vLLM's Responses store is per server and in memory, so a `previous_response_id` works only on the
server that created it. The owner map lives apart from the prefix ownership store (its own small
protocol and key prefix `kvroute:resp:`), in memory or in Redis (`REDIS_URL`). A turn is kept as
its own record pointing at the previous one, so storing a conversation costs its size once, not
once per turn; rebuilding walks the chain, which happens only after a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from app.config import redact_url
from app.looplag import LoopLag
from app.redislink import redis_deadline, redis_trouble, writer_deadline

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("kvroute.responses")

MAX_ENTRIES = 200_000  # memory bound of each in-process map (LRU)
HISTORY_MEMORY_BYTES = 256 << 20  # RESPONSES_HISTORY_MEMORY_BYTES' default
# Records Redis refused, kept by key to be written once it answers (values stay in memory).
MAX_UNWRITTEN = 100_000
MAX_TURNS = 10_000  # a chain walked further than this is treated as lost
OwnerState = Literal["live", "lost"]


@dataclass(frozen=True, slots=True)
class Owner:
    backend: str
    state: OwnerState  # "lost": its backend restarted after the record, so forgot the response


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored turn: this turn's input and output items, and the turn before it."""

    previous: str | None
    items: list[Any]
    chain_bytes: int  # bytes of the items of this turn and every earlier one


class ResponseStore(Protocol):
    async def owner(self, response_id: str) -> Owner | None: ...

    async def remember(self, response_id: str, backend: str) -> None: ...

    async def turn(self, tenant: str, response_id: str) -> Turn | None: ...

    async def keep_turn(self, tenant: str, response_id: str, turn: Turn) -> None: ...

    async def forget_backend(self, backend: str, since_s: float) -> None:
        """`backend` restarted within the last `since_s` seconds: what it recorded before that
        is lost; what came after may be on the new process (tried; its 404 tells)."""
        ...

    def describe(self) -> dict[str, object]: ...

    async def run(self) -> None:
        """Background work for the app's lifetime (none in memory)."""
        ...


def tenant_tag(tenant: str) -> str:
    """A tenant in a key: hashed, so no tenant name (an address, a user id) is stored in clear."""
    return hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _encode_owner(backend: str, wall_ms: int) -> bytes:
    return f"{wall_ms}|{backend}".encode()


def _decode_owner(value: object) -> tuple[str, int] | None:
    if not isinstance(value, bytes | str):
        return None
    text = value.decode() if isinstance(value, bytes) else value
    ms, sep, backend = text.partition("|")
    if not sep or not ms.isdigit():
        return None
    return backend, int(ms)


def _encode_turn(turn: Turn) -> bytes:
    return orjson.dumps({"p": turn.previous, "i": turn.items, "b": turn.chain_bytes})


def _decode_turn(value: object) -> Turn | None:
    if not isinstance(value, bytes | str):
        return None
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("i"), list):
        return None
    previous = data.get("p")
    return Turn(previous if isinstance(previous, str) else None, data["i"], int(data.get("b") or 0))


class _Expiring:
    """A bounded map with a time to live: past MAX_ENTRIES entries (or `max_bytes` of keys and
    values, for maps of large values), the least recently written go first."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float], max_bytes: int = sys.maxsize
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        found = self.with_ttl(key)
        return None if found is None else found[0]

    def put(self, key: str, value: bytes) -> None:
        if key in self._items:
            self._drop(key)
        self._items[key] = (self._clock() + self.ttl_s, value)
        self.bytes += len(key) + len(value)
        while len(self._items) > MAX_ENTRIES or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self.bytes -= len(key) + len(value)

    def with_ttl(self, key: str) -> tuple[bytes, float] | None:
        """The value and the seconds it has left, or None when gone (an expired one is dropped)."""
        found = self._items.get(key)
        if found is None:
            return None
        left_s = found[0] - self._clock()
        if left_s <= 0:
            self._drop(key)
            return None
        return found[1], left_s

    def __len__(self) -> int:
        return len(self._items)


class MemoryResponses:
    """Owners and turns in this process (one router, or tests)."""

    def __init__(
        self,
        owner_ttl_s: float,
        history_ttl_s: float,
        *,
        history_max_bytes: int = HISTORY_MEMORY_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._owners = _Expiring(owner_ttl_s, clock)  # small records: the count bounds it
        self._turns = _Expiring(history_ttl_s, clock, history_max_bytes)
        self._wall_ms = wall_ms
        self.forgotten_ms: dict[str, int] = {}  # backend -> wall ms of its last restart

    def owner_from(self, value: object) -> Owner | None:
        parsed = _decode_owner(value)
        if parsed is None:
            return None
        backend, ms = parsed
        lost = ms <= self.forgotten_ms.get(backend, -1)
        return Owner(backend, "lost" if lost else "live")

    async def owner(self, response_id: str) -> Owner | None:
        return self.owner_from(self._owners.get(response_id))

    def remember_now(self, response_id: str, backend: str) -> bytes:
        value = _encode_owner(backend, self._wall_ms())
        self._owners.put(response_id, value)
        return value

    async def remember(self, response_id: str, backend: str) -> None:
        self.remember_now(response_id, backend)

    async def turn(self, tenant: str, response_id: str) -> Turn | None:
        return _decode_turn(self._turns.get(f"{tenant_tag(tenant)}:{response_id}"))

    def keep_turn_now(self, tenant: str, response_id: str, data: bytes) -> None:
        self._turns.put(f"{tenant_tag(tenant)}:{response_id}", data)

    async def keep_turn(self, tenant: str, response_id: str, turn: Turn) -> None:
        self.keep_turn_now(tenant, response_id, _encode_turn(turn))

    async def forget_backend(self, backend: str, since_s: float) -> None:
        # Not "now": a response stored between the restart and the probe that noticed it is
        # held by the new process, and calling it lost would refuse (410) a live conversation.
        restarted_ms = self._wall_ms() - int(since_s * 1000)
        self.forgotten_ms[backend] = max(restarted_ms, self.forgotten_ms.get(backend, -1))

    def stored(self, key: str) -> tuple[bytes, float] | None:
        """A record by its Redis key (`o:<id>`, `h:<tenant tag>:<id>`): value, seconds left."""
        kind, _, rest = key.partition(":")
        return (self._owners if kind == "o" else self._turns).with_ttl(rest)

    async def run(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {
            "kind": "memory",
            "owners": len(self._owners),
            "turns": len(self._turns),
            "turn_bytes": self._turns.bytes,
        }


class RedisResponses:
    """Owners and turns shared by router replicas through Redis (`kvroute:resp:` keys).

    Writes are awaited (one SET, bounded by the Redis timeout, which like ownership's counts only
    the time our loop was free to read the answer: a saturated router is not a failed Redis): the
    record must exist before the client can send its next turn, maybe to another replica. When
    Redis fails, memory serves this replica, and Redis is not tried again for `retry_s` (a
    request would wait out the timeout on each call). A record Redis refused or was not asked to
    keep meanwhile is written once it answers (`run`), from memory, with the time it has left, so
    that the other replicas can continue a conversation this one served alone. The failure is
    logged once per outage.
    """

    def __init__(
        self,
        redis: Redis,
        url: str,
        *,
        owner_ttl_s: float,
        history_ttl_s: float,
        timeout_s: float,
        retry_s: float,
        history_memory_bytes: int = HISTORY_MEMORY_BYTES,
        prefix: str = "kvroute:resp:",
        lag: LoopLag | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.url = url
        self.lag = lag or LoopLag()
        self.memory = MemoryResponses(
            owner_ttl_s, history_ttl_s, history_max_bytes=history_memory_bytes, clock=clock
        )
        self.owner_ttl_ms = int(owner_ttl_s * 1000)
        self.history_ttl_ms = int(history_ttl_s * 1000)
        self.timeout_s = timeout_s
        self.cap_s = max(timeout_s * 4, 2.0)  # a slow Redis behind a saturated loop
        self.retry_s = retry_s
        self.prefix = prefix
        self._clock = clock
        self._trouble = redis_trouble()
        self.down_until = 0.0
        self.errors = 0
        self._unwritten: OrderedDict[str, None] = OrderedDict()  # keys, oldest first
        self._held = asyncio.Event()  # a record waits
        self._back = asyncio.Event()  # Redis answered while records wait
        self.rewritten = 0
        self.unwritten_dropped = 0  # past MAX_UNWRITTEN, or gone from memory before Redis was back

    def _up(self) -> bool:
        return self._clock() >= self.down_until

    def _recovered(self) -> None:
        if self.down_until != 0.0:
            log.info("Redis at %s is back: response owners shared again", redact_url(self.url))
            self.down_until = 0.0
        if self._unwritten:
            self._back.set()

    def _failed(self, exc: BaseException) -> None:
        if self.down_until == 0.0:
            log.warning(
                "Redis at %s failed (%s: %s): response owners served from memory",
                redact_url(self.url),
                type(exc).__name__,
                exc,
            )
        self.errors += 1
        self.down_until = self._clock() + self.retry_s

    async def _get(self, key: str) -> object:
        if not self._up():
            return None  # failed a moment ago: not tried again before `retry_s`
        try:
            async with redis_deadline(self.timeout_s, self.lag, self.cap_s):
                value = await self._redis.get(self.prefix + key)
        except self._trouble as exc:
            self._failed(exc)
            return None
        self._recovered()
        return value

    async def _set(self, key: str, value: bytes, ttl_ms: int) -> None:
        if not self._up():
            self._hold(key)  # written once Redis is back (`run`)
            return
        try:
            async with redis_deadline(self.timeout_s, self.lag, self.cap_s):
                await self._redis.set(self.prefix + key, value, px=ttl_ms)
        except self._trouble as exc:
            self._failed(exc)
            self._hold(key)
            return
        self._unwritten.pop(key, None)  # (a newer value just went)
        self._recovered()

    def _hold(self, key: str) -> None:
        self._unwritten[key] = None
        self._unwritten.move_to_end(key)
        self._held.set()
        while len(self._unwritten) > MAX_UNWRITTEN:
            self._unwritten.popitem(last=False)
            self.unwritten_dropped += 1

    async def run(self) -> None:
        """Write what Redis refused once it answers: after any call succeeds, or every
        `retry_s` while records wait and nothing else tries."""
        while True:
            if not self._unwritten:
                await self._held.wait()
                self._held.clear()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.retry_s):
                    await self._back.wait()
            self._back.clear()
            await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        while self._unwritten:
            keys = list(itertools.islice(self._unwritten, 256))
            records = [(k, self.memory.stored(k)) for k in keys]
            try:
                async with (
                    writer_deadline(self.timeout_s, self.lag, self.cap_s),
                    self._redis.pipeline(transaction=False) as pipe,
                ):
                    for key, found in records:
                        if found is not None:
                            value, left_s = found
                            pipe.set(self.prefix + key, value, px=max(1, int(left_s * 1000)))
                    await pipe.execute()
            except self._trouble as exc:
                self._failed(exc)
                return
            self._recovered()
            for key, found in records:
                self._unwritten.pop(key, None)
                if found is None:
                    self.unwritten_dropped += 1
                else:
                    self.rewritten += 1

    async def owner(self, response_id: str) -> Owner | None:
        found = await self.memory.owner(response_id)
        if found is not None:
            return found
        return self.memory.owner_from(await self._get("o:" + response_id))

    async def remember(self, response_id: str, backend: str) -> None:
        value = self.memory.remember_now(response_id, backend)
        await self._set("o:" + response_id, value, self.owner_ttl_ms)

    async def turn(self, tenant: str, response_id: str) -> Turn | None:
        found = await self.memory.turn(tenant, response_id)
        if found is not None:
            return found
        return _decode_turn(await self._get(f"h:{tenant_tag(tenant)}:{response_id}"))

    async def keep_turn(self, tenant: str, response_id: str, turn: Turn) -> None:
        data = _encode_turn(turn)
        self.memory.keep_turn_now(tenant, response_id, data)
        await self._set(f"h:{tenant_tag(tenant)}:{response_id}", data, self.history_ttl_ms)

    async def forget_backend(self, backend: str, since_s: float) -> None:
        await self.memory.forget_backend(backend, since_s)

    def describe(self) -> dict[str, object]:
        return {
            **self.memory.describe(),
            "kind": "redis",
            "state": "up" if self._up() else "down (serving from memory)",
            "errors": self.errors,
            "unwritten": len(self._unwritten),
            "rewritten": self.rewritten,
            "unwritten_dropped": self.unwritten_dropped,
        }


# --- conversation items ----------------------------------------------------------------------
def input_items(value: Any) -> list[Any]:
    """A request's `input` as items: a string is one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def output_items(body: Mapping[str, Any]) -> list[Any]:
    """A finished response's output as input items for a later turn: messages become assistant
    messages with their text; tool calls stay as they are; reasoning is left out (vLLM too)."""
    items: list[Any] = []
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            text = "".join(
                str(part.get("text", ""))
                for part in item.get("content") or []
                if isinstance(part, dict)
            )
            items.append({"role": "assistant", "content": text})
        elif kind in ("function_call", "function_call_output"):
            items.append(item)
    return items


async def history(store: ResponseStore, tenant: str, response_id: str) -> list[Any] | None:
    """Every item of the conversation up to and including `response_id`, oldest first; None
    when a turn of it is not kept (expired, over the size cap, another tenant's)."""
    turns: list[list[Any]] = []
    current: str | None = response_id
    while current is not None:
        if len(turns) >= MAX_TURNS:
            return None
        turn = await store.turn(tenant, current)
        if turn is None:
            return None
        turns.append(turn.items)
        current = turn.previous
    return [item for items in reversed(turns) for item in items]


async def keep_turn(
    store: ResponseStore,
    tenant: str,
    response_id: str,
    previous: str | None,
    items: list[Any],
    max_bytes: int,
) -> bool:
    """Keep one turn unless the conversation would pass `max_bytes` (or its start is gone):
    then it cannot be continued after a loss, and the router says so when that happens."""
    size = len(orjson.dumps(items))
    if previous is not None:
        before = await store.turn(tenant, previous)
        if before is None:
            return False
        size += before.chain_bytes
    if size > max_bytes:
        return False
    await store.keep_turn(tenant, response_id, Turn(previous, items, size))
    return True
