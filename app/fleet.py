"""Changing the fleet while the router runs: add, drain, cut; the backends file; the replicas.

`Fleet` is the one place the pool's membership changes after start-up. The admin API, the
watched `BACKENDS_FILE` and the Redis membership (shared by replicas) all call it:

    add(url)          the backend joins as `probing`; the probes make it `serving`
    remove(name)      `draining`: no new requests, open ones run up to DRAIN_TIMEOUT_S, then it
                      leaves the pool (what is still open is cut); its conversations move on
    remove(name, drain=False)   leaves at once: its open streams end with an error event

With `REDIS_URL` the membership lives in Redis (`RedisMembership`): a hash of entries and a
version key bumped on each change; every replica polls the version and applies what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from app.backends import Backend, BackendPool
from app.config import backend_url
from app.errors import BadRequest, Conflict, KvrouteError, NoHealthyBackend, NotFound

# (functions: importing redis pulls in OpenTelemetry)
from app.redislink import cancellation_kept, redis_trouble

log = logging.getLogger("kvroute.fleet")

T = TypeVar("T")
Action = Literal["add", "drain", "cut", "remove"]
POLL_S = 0.25  # replicas see a change within about this (plus one Redis round trip)
FILE_POLL_S = 0.5
# A drained or cut entry stays in Redis this long after its backend left, so that every
# replica reads "draining"/"cut" rather than only its absence.
TOMBSTONE_S = 2.0
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class FleetUnavailable(NoHealthyBackend):
    """Redis, holding the replicas' membership, did not answer: the change was not made."""

    code = "fleet_unavailable"


@dataclass(frozen=True, slots=True)
class Entry:
    """A backend as the shared membership records it."""

    url: str
    state: Literal["serving", "draining", "cut"] = "serving"
    api_key: str = ""
    until_s: float = 0.0  # wall clock: when a drain ends

    def dump(self) -> bytes:
        return orjson.dumps(
            {"url": self.url, "state": self.state, "api_key": self.api_key, "until": self.until_s}
        )

    @classmethod
    def load(cls, raw: bytes | str) -> Entry:
        data = orjson.loads(raw)
        return cls(data["url"], data["state"], data.get("api_key", ""), data.get("until", 0.0))


def check_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not set(name) <= NAME_CHARS:
        raise BadRequest("'name' must be 1 to 64 letters, digits, '-', '_' or '.'", param="name")
    return name


def check_url(url: object) -> str:
    if not isinstance(url, str):
        raise BadRequest("'url' must be a string such as http://10.0.0.5:8000", param="url")
    try:
        return backend_url(url)
    except ValueError as exc:
        raise BadRequest(str(exc), param="url") from None


class Fleet:
    def __init__(
        self,
        pool: BackendPool,
        *,
        drain_timeout_s: float,
        membership: RedisMembership | None = None,
        backends_file: str = "",
        forget: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self._forget = forget
        self.drain_timeout_s = drain_timeout_s
        self.membership = membership
        self.changes: Counter[str] = Counter()
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen_version: int | None = None
        self.watcher = BackendsFile(Path(backends_file), self) if backends_file else None

    # --- the operations ------------------------------------------------------------------
    async def add(self, url: str, *, name: str | None = None, api_key: str = "") -> Backend:
        url = check_url(url)
        if name is not None:
            check_name(name)
        self._check_free(url, name)
        if self.membership is not None:
            name = await self._add_shared(url, name, api_key)
        backend = self.pool.find(name) if name else None
        if backend is None:  # (the poll may have applied the shared entry already)
            backend = await self._join(url, name, api_key)
        return backend

    async def _join(self, url: str, name: str | None, api_key: str) -> Backend:
        backend = self.pool.add(url, name=name, api_key=api_key)
        self._count("add", backend)
        if self._forget is not None:
            # A name used before (a redeployed `gpu1-8000`) starts without the old server's
            # ownership records: its cache is empty.
            await self._forget(backend.name)
        return backend

    def _check_free(self, url: str, name: str | None) -> None:
        if self.pool.by_url(url) is not None:
            raise Conflict(f"{url} is already in the pool", param="url")
        if name is not None and self.pool.find(name) is not None:
            raise Conflict(f"a backend named {name!r} is already in the pool", param="name")

    async def _add_shared(self, url: str, name: str | None, api_key: str) -> str:
        assert self.membership is not None
        for _ in range(5):  # another replica may take the name we picked first
            taken = await self._shared(self.membership.entries())
            chosen = name or self.pool.next_name(taken)
            answer = await self._shared(self.membership.put_new(chosen, url, api_key))
            if answer == "ok":
                return chosen
            if answer == "missing":
                await self._shared(self._seed())
                continue
            if answer == "url":
                raise Conflict(f"{url} is already in the pool", param="url")
            if name is not None:
                raise Conflict(f"a backend named {name!r} is already in the pool", param="name")
        raise Conflict("could not pick a free name; give one", param="name")

    async def remove(self, name: str, *, drain: bool = True) -> Backend:
        backend = self.pool.find(name)
        if backend is None:
            raise NotFound(f"no backend named {name!r}", param="name")
        if self.membership is not None:
            until = time.time() + (self.drain_timeout_s if drain else 0.0)
            entry = Entry(backend.url, "draining" if drain else "cut", backend.api_key, until)
            if not await self._shared(self.membership.put(name, entry)):
                await self._shared(self._seed())
                await self._shared(self.membership.put(name, entry))
        self._leave(backend, self.drain_timeout_s if drain else None, shared=True)
        return backend

    def _leave(self, backend: Backend, timeout_s: float | None, *, shared: bool = False) -> None:
        """Drain `backend` for up to `timeout_s` (None: cut it now) in a task of the fleet's."""
        if backend.cut or (backend.draining and timeout_s is not None):
            return  # already leaving
        self.pool.drain(backend.name)
        self._count("drain" if timeout_s is not None else "cut", backend)
        task = asyncio.get_running_loop().create_task(self._drain(backend, timeout_s, shared))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, backend: Backend, timeout_s: float | None, shared: bool) -> None:
        started = self._clock()
        if timeout_s:
            backend.idle = asyncio.Event()  # set by the lease that brings in_flight to 0
            if backend.in_flight:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        await backend.idle.wait()
        if backend.in_flight:
            log.warning("backend %s: %d requests cut", backend.name, backend.in_flight)
        if self.pool.remove(backend.name) is backend:
            self._count("remove", backend)
        # Its ownership records stay until they expire: the next request of each of its
        # conversations finds its owner gone, goes elsewhere as `reassigned`, and moves the
        # record there. (Deleting them would make that request a `miss`, a new conversation.)
        if shared and self.membership is not None:
            await asyncio.sleep(max(0.0, started + TOMBSTONE_S - self._clock()))
            with contextlib.suppress(*redis_trouble()):
                await self.membership.delete(backend.name)

    def _count(self, action: Action, backend: Backend) -> None:
        self.changes[action] += 1
        log.info("fleet: %s %s (%s)", action, backend.name, backend.url)

    @staticmethod
    async def _shared(call: Awaitable[T]) -> T:
        try:
            return await call
        except redis_trouble() as exc:
            raise FleetUnavailable(f"the shared fleet membership is unavailable: {exc}") from exc

    # --- replicas --------------------------------------------------------------------------
    async def start(self) -> None:
        """Before the first probe: the shared membership read (or seeded with ours), the
        backends file read."""
        if self.membership is not None:
            try:
                await self.sync()  # the first replica seeds the membership with its fleet
                await self.sync()
            except redis_trouble() as exc:
                log.warning("fleet membership in Redis unreadable at start (%s); retrying", exc)
        if self.watcher is not None:
            await self.watcher.apply()

    async def sync(self) -> None:
        """Apply the shared membership when its version moved."""
        assert self.membership is not None
        version = await self.membership.version()
        if version is None:
            await self._seed()
            return
        if version == self._seen_version:
            return
        entries = await self.membership.entries()
        if self._seen_version is None:
            self._warn_if_configured_differently(entries)
        await self.apply(entries)
        self._seen_version = version

    def _warn_if_configured_differently(self, entries: dict[str, Entry]) -> None:
        """The shared membership wins over BACKEND_URLS (it holds what the admin API and the
        other replicas changed since): say so loudly where they differ, since a Redis left
        holding another fleet's membership would otherwise drain this one's backends quietly."""
        differences = []
        for backend in self.pool.backends:
            entry = entries.get(backend.name)
            if entry is None or entry.state != "serving":
                differences.append(f"{backend.name} ({backend.url}) is not serving there: drained")
            elif entry.url != backend.url:
                differences.append(f"{backend.name} is {entry.url} there, {backend.url} here")
        for name, entry in entries.items():
            if entry.state == "serving" and self.pool.find(name) is None:
                differences.append(f"{name} ({entry.url}) joins from there")
        if differences:
            assert self.membership is not None
            log.warning(
                "the fleet membership in Redis differs from BACKEND_URLS and wins: %s. If Redis "
                "holds another fleet's, delete %s and %s to start again from BACKEND_URLS",
                "; ".join(differences),
                self.membership.members,
                self.membership.version_key,
            )

    async def _seed(self) -> None:
        """Redis lost the membership (flushed, restarted empty): ours seeds it again, rather
        than an empty one draining every backend. What the others seeded too is applied at the
        next poll."""
        assert self.membership is not None
        log.warning("fleet membership missing from Redis; writing this replica's")
        await self.membership.seed(
            {
                b.name: Entry(b.url, api_key=b.api_key)
                for b in self.pool.backends
                if not (b.draining or b.cut)  # (leaving: not written back as serving)
            }
        )
        self._seen_version = None

    async def apply(self, entries: dict[str, Entry]) -> None:
        """Make the local pool what `entries` say; a backend missing from them is drained."""
        for name, entry in entries.items():
            backend = self.pool.find(name)
            if entry.state == "serving" and backend is None:
                if self.pool.by_url(entry.url) is None:
                    await self._join(entry.url, name, entry.api_key)
            elif entry.state == "draining" and backend is not None:
                self._leave(backend, max(0.0, entry.until_s - time.time()))
            elif entry.state == "cut" and backend is not None:
                self._leave(backend, None)
        for backend in self.pool.backends:
            if backend.name not in entries:
                self._leave(backend, self.drain_timeout_s)

    async def run(self) -> None:
        """The lifespan's task: replicas' changes polled, the backends file watched."""
        try:
            while True:
                await asyncio.sleep(POLL_S)
                await self._tick(self.watcher)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick(self, watcher: BackendsFile | None) -> None:
        if self.membership is not None:
            try:
                await self.sync()
            except redis_trouble() as exc:
                log.warning("fleet membership in Redis unreadable (%s); retrying", exc)
        if watcher is not None and watcher.is_due(self._clock()):
            await watcher.apply()


class RedisMembership:
    """The fleet in Redis: `{prefix}:members` (name -> Entry) and `{prefix}:version`. Both keys
    share a hash tag, so the scripts run on one Redis Cluster node too."""

    # Adds `name` unless the name or the URL is present: "ok", "name" or "url". An entry left
    # by a drain whose replica stopped before deleting it (ARGV[4]: now) no longer counts.
    _PUT_NEW = """
    if redis.call('EXISTS', KEYS[2]) == 0 then return 'missing' end
    local all = redis.call('HGETALL', KEYS[1])
    for i = 1, #all, 2 do
      local e = cjson.decode(all[i + 1])
      if e.state ~= 'serving' and e['until'] + 10 < tonumber(ARGV[4]) then
        redis.call('HDEL', KEYS[1], all[i])
      elseif all[i] == ARGV[1] then return 'name'
      elseif e.url == ARGV[2] then return 'url' end
    end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
    redis.call('INCR', KEYS[2])
    return 'ok'
    """

    # A change to a membership Redis lost (flushed, restarted empty) is refused: written, it
    # would leave a membership of that one entry, and every other replica would drain the rest.
    _PUT = """
    if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    redis.call('INCR', KEYS[2])
    return 1
    """
    _DELETE = """
    if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('INCR', KEYS[2])
    return 1
    """

    # A new membership's version starts at the time in µs, not at 1: a replica that saw version
    # N of the lost one must not take the new one's N for the same (it would apply nothing).
    _SEED = """
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('SET', KEYS[2], ARGV[1])
    else
      redis.call('INCR', KEYS[2])
    end
    for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return 1
    """

    def __init__(self, redis: Any, prefix: str = "kvroute:{fleet}") -> None:
        self.redis = redis
        self.members = f"{prefix}:members"
        self.version_key = f"{prefix}:version"

    @cancellation_kept()
    async def version(self) -> int | None:
        raw = await self.redis.get(self.version_key)
        return None if raw is None else int(raw)

    @cancellation_kept()
    async def entries(self) -> dict[str, Entry]:
        raw = await self.redis.hgetall(self.members)
        out = {}
        for name, value in raw.items():
            key = name.decode() if isinstance(name, bytes) else name
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                out[key] = Entry.load(value)
        return out

    @cancellation_kept()
    async def put_new(self, name: str, url: str, api_key: str) -> str:
        entry = Entry(url, api_key=api_key).dump()
        answer = await self.redis.eval(
            self._PUT_NEW, 2, self.members, self.version_key, name, url, entry, time.time()
        )
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    @cancellation_kept()
    async def put(self, name: str, entry: Entry) -> bool:
        """Whether it was written (False: the membership is missing; seed it first)."""
        args = (self._PUT, 2, self.members, self.version_key, name, entry.dump())
        return bool(await self.redis.eval(*args))

    @cancellation_kept()
    async def delete(self, name: str) -> bool:
        """Whether it was deleted (False: the membership is missing, so is `name`)."""
        return bool(await self.redis.eval(self._DELETE, 2, self.members, self.version_key, name))

    @cancellation_kept()
    async def seed(self, entries: dict[str, Entry]) -> None:
        """The first replica's fleet becomes the shared one (a later one reads it instead)."""
        pairs = [part for name, entry in entries.items() for part in (name, entry.dump())]
        args = (self.members, self.version_key, time.time_ns() // 1000, *pairs)
        await self.redis.eval(self._SEED, 2, *args)


# --- the backends file -----------------------------------------------------------------------
def parse_backends_file(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """URLs (one a line, `#` comments), and the malformed lines as (line number, why)."""
    urls: list[str] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        try:
            url = backend_url(url)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if url not in urls:
            urls.append(url)
    return urls, problems


class BackendsFile:
    """Edits of BACKENDS_FILE applied like the admin API: a new URL added, a removed one
    drained (only those the file added: not BACKEND_URLS' nor the API's). A malformed line is logged and skipped; while any is there (or the file cannot be
    read), removals wait, so that a bad edit never drops a backend."""

    def __init__(self, path: Path, fleet: Fleet) -> None:
        self.path = path
        self.fleet = fleet
        self._listed: set[str] = set()  # the URLs this file put in the pool
        self._text: str | None = None
        self._next_s = 0.0

    def is_due(self, now_s: float) -> bool:
        if now_s < self._next_s:
            return False
        self._next_s = now_s + FILE_POLL_S
        return True

    async def apply(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if self._text is not None:
                log.warning("BACKENDS_FILE %s unreadable (%s); the fleet is kept", self.path, exc)
            self._text = None
            return
        if text == self._text:
            return
        self._text = text
        urls, problems = parse_backends_file(text)
        for number, why in problems:
            log.warning("BACKENDS_FILE %s line %d skipped: %s", self.path, number, why)
        owned = self._listed & set(urls)
        for url in urls:
            if self.fleet.pool.by_url(url) is None and await self._quietly(self.fleet.add(url)):
                owned.add(url)
        gone = self._listed - set(urls)
        if problems and gone:
            log.warning(
                "BACKENDS_FILE %s: %d backends no longer listed are kept until the malformed "
                "lines are fixed",
                self.path,
                len(gone),
            )
        else:
            for backend in self._leaving(gone):
                await self._quietly(self.fleet.remove(backend.name))
        self._listed = owned | (gone if problems else set())

    def _leaving(self, urls: set[str]) -> Iterator[Backend]:
        for url in sorted(urls):
            backend = self.fleet.pool.by_url(url)
            if backend is not None and not backend.draining:
                yield backend

    async def _quietly(self, change: Awaitable[object]) -> bool:
        try:
            await change
        except KvrouteError as exc:  # a race with the API or another replica: logged, not fatal
            log.warning("BACKENDS_FILE %s: %s", self.path, exc.message)
            return False
        return True


class FleetCollector(Collector):
    """`kvroute_fleet_changes{action}` for Prometheus."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "kvroute_fleet_changes",
            "Backends added, drained, cut and removed while running",
            labels=["action"],
        )
        for action in ("add", "drain", "cut", "remove"):
            family.add_metric([action], self.fleet.changes[action])
        yield family
