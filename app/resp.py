"""A lean Redis link for the request path: one connection to one node that carries every
concurrent look-up, pipelined, replies parsed by hiredis in `data_received`.

Why not redis-py for this: its pipeline of two reads wakes the calling task six times (pool,
connection checks, one read per reply), and on a router whose loop relays a few dozen streams
each wake waits a whole loop turn behind them: 8-11 ms p50 per look-up where Redis answers in
0.1 ms. Here a call writes its commands and sleeps on one future that the reply completes, so it
waits two turns (the reply's arrival, then its own wake-up: `bench.lookup` counts 2.0 against
6.1) at under half the CPU.

Redis answers in order, so replies are matched to calls by a FIFO. A call that leaves before its
answer (its deadline, its client) leaves its slot in the FIFO: the answer is read and dropped.
A caller whose deadline judged Redis too slow calls `reset`: a connection gone silent (a
partition, a frozen host: no error, no reset) is then replaced at the next call, as redis-py
drops a connection whose read timed out. Memory stays bounded: at most `max_pending` unanswered
calls, and a connection whose oldest call has waited `stale_s` (far past any deadline) is
dropped even if nobody reset it.

redis-py stays for everything else (the background writers, TLS, credential providers):
`links_for` says whether a client's connections can be reproduced here. On a Redis Cluster there
is one link per node, found through redis-py's slot map.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster

Command = Sequence[str | bytes | int | float]


@dataclass(frozen=True, slots=True)
class RespTarget:
    """Where and as whom to connect: a TCP host and port, or a unix socket path."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None


def target_of(client: Any) -> RespTarget | None:
    """The target of a single-node redis-py client whose connections are plain TCP or a unix
    socket with at most a password and a database number; None for anything else (TLS, a
    credential provider, a cluster: see `links_for`), which keeps redis-py."""
    from redis.asyncio import Redis
    from redis.asyncio.connection import UnixDomainSocketConnection

    if not isinstance(client, Redis):
        return None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if pool.connection_class is UnixDomainSocketConnection:
        if kwargs.get("credential_provider") is not None:
            return None
        path, db = str(kwargs["path"]), int(kwargs.get("db") or 0)
        return RespTarget(
            path=path, db=db, username=kwargs.get("username"), password=kwargs.get("password")
        )
    return _tcp_target(pool.connection_class, kwargs)


def _tcp_target(connection_class: type, kwargs: dict[str, Any]) -> RespTarget | None:
    from redis.asyncio.connection import Connection

    if connection_class is not Connection or kwargs.get("credential_provider") is not None:
        return None  # TLS (SSLConnection), or credentials only redis-py knows how to get
    return RespTarget(
        host=str(kwargs.get("host", "localhost")),
        port=int(kwargs.get("port", 6379)),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
    )


def links_for(client: Any) -> Links | None:
    """The lean links for a redis-py client: one link to a single node, one per node of a
    cluster; None where only redis-py can connect (TLS, a credential provider)."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        kwargs = client.get_connection_kwargs()
        connection_class = kwargs.get("connection_class") or type(None)
        template = _tcp_target(connection_class, {**kwargs, "db": 0})
        return ClusterLinks(client, template) if template is not None else None
    target = target_of(client)
    return RespLink(target) if target is not None else None


def redirect_of(reply: Exception, host: str) -> tuple[str, str, int] | None:
    """`MOVED` or `ASK` and the node of a `MOVED|ASK <slot> <host>:<port>` error reply (an
    empty host: `host`'s)."""
    parts = str(reply).split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    where, _, port = parts[2].rpartition(":")
    return (parts[0], where or host, int(port)) if port.isdigit() else None


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script and its SHA1, for EVALSHA (EVAL once when the server does not know it)."""

    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> LuaScript:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


def encode(commands: Sequence[Command]) -> bytes:
    """RESP arrays of bulk strings, one per command."""
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()  # (floats: repr)
            out += b"$%d\r\n%s\r\n" % (len(data), data)
    return bytes(out)


class _Call:
    __slots__ = ("future", "replies", "sent", "wanted")

    def __init__(self, future: asyncio.Future[list[object]], wanted: int, sent: float) -> None:
        self.future = future
        self.replies: list[object] = []
        self.wanted = wanted
        self.sent = sent


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        import hiredis
        from redis.exceptions import InvalidResponse, ResponseError

        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.calls: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        from redis.exceptions import InvalidResponse

        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if not self.calls:
                    raise InvalidResponse("Redis answered a command nobody sent")
                call = self.calls[0]
                call.replies.append(reply)
                if len(call.replies) == call.wanted:
                    self.calls.popleft()
                    if not call.future.done():  # (its caller may have left)
                        call.future.set_result(call.replies)
        except InvalidResponse as exc:
            self.close(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.fail(exc or RedisConnectionError("Redis closed the connection"))

    def fail(self, exc: BaseException) -> None:
        self.lost = self.lost or exc
        while self.calls:
            call = self.calls.popleft()
            if not call.future.done():
                call.future.set_exception(exc)

    def close(self, exc: BaseException) -> None:
        self.fail(exc)
        if self.transport is not None:
            self.transport.abort()


class Links(Protocol):
    """The lean links of one Redis deployment: `on(key)` is the link to the node that serves
    `key` (a single node's one link, or a cluster node's)."""

    async def on(self, key: str) -> RespLink: ...

    async def warm(self, timeout_s: float) -> bool: ...

    async def aclose(self) -> None: ...


class RespLink:
    """One pipelined connection to one Redis node, opened on first use and again after a loss.

    `execute` raises what redis-py would: `ConnectionError` (refused, lost, too many waiting),
    `ResponseError` (an error reply), `OSError`; the caller's deadline bounds the wait."""

    def __init__(
        self,
        target: RespTarget,
        *,
        max_pending: int = 4096,
        stale_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_redirect: Callable[[], None] | None = None,
        follow: Callable[[str, int], RespLink] | None = None,
    ) -> None:
        self.target = target
        self.on_redirect = on_redirect  # a cluster node answered MOVED or ASK
        self.follow = follow  # a cluster's link to the node a MOVED names
        self.max_pending = max_pending
        self.stale_s = stale_s
        self._clock = clock
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self.connects = 0  # connections opened (read by the tests)

    async def on(self, key: str) -> RespLink:
        return self  # a single node serves every key

    async def execute(
        self,
        commands: Sequence[Command],
        *,
        redirected: bool = False,
        used: list[RespLink] | None = None,
    ) -> list[object]:
        """Send `commands` in one write and return their replies in order; the first error
        reply is raised. On a cluster a redirection is followed once, as redis-py follows it:
        a MOVED (the slot was resharded away; the slot map is re-read in the background) and an
        ASK (the slot is migrating and these keys have left: each command again there, after an
        ASKING). Every link the call waits on goes in `used`, for a caller whose deadline ends
        there to reset it."""
        from redis.exceptions import ConnectionError as RedisConnectionError

        if used is not None and self not in used:
            used.append(self)
        protocol = await self._connected()
        if len(protocol.calls) >= self.max_pending:
            raise RedisConnectionError(f"{self.max_pending} Redis calls already unanswered")
        replies = await self._send(protocol, commands)
        follow = None if redirected else self.follow  # (a redirection is followed once)
        redirects: dict[tuple[str, RespLink], list[int]] = {}  # (MOVED|ASK, link) -> commands
        for index, reply in enumerate(replies):
            if not isinstance(reply, Exception):
                continue
            redirect = redirect_of(reply, self.target.host)
            if redirect is not None and self.on_redirect is not None:
                self.on_redirect()
            if redirect is None or follow is None:
                raise reply
            kind, host, port = redirect
            redirects.setdefault((kind, follow(host, port)), []).append(index)
        for (kind, there), indexes in redirects.items():
            # Only the commands redirected go there: in a migrating slot the keys still here
            # are answered here. ASKING admits only the command after it. (A multi-key command
            # whose keys the migration split gets TRYAGAIN, raised: the caller falls back.)
            wanted = [commands[index] for index in indexes]
            if kind == "ASK":
                asked = [part for command in wanted for part in (("ASKING",), command)]
                answers = (await there.execute(asked, redirected=True, used=used))[1::2]
            else:
                answers = await there.execute(wanted, redirected=True, used=used)
            for index, answer in zip(indexes, answers, strict=True):
                replies[index] = answer
        return replies

    async def run_script(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[str | bytes | int | float],
        *,
        used: list[RespLink] | None = None,
    ) -> object:
        """EVALSHA, or EVAL when the server does not have the script (a restart, a flush, a
        new node): what redis-py's `Script` does, in one round trip when it is known."""
        from redis.exceptions import ResponseError

        tail = (len(keys), *keys, *args)
        try:
            return (await self.execute([("EVALSHA", script.sha, *tail)], used=used))[0]
        except ResponseError as exc:  # (hiredis gives every error reply this one class)
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return (await self.execute([("EVAL", script.text, *tail)], used=used))[0]

    def _send(
        self, protocol: _Protocol, commands: Sequence[Command]
    ) -> asyncio.Future[list[object]]:
        assert protocol.transport is not None
        protocol.transport.write(encode(commands))
        future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        protocol.calls.append(_Call(future, len(commands), self._clock()))
        return future

    async def _connected(self) -> _Protocol:
        from redis.exceptions import ConnectionError as RedisConnectionError

        if self._closed:
            raise RedisConnectionError("the Redis link is closed")
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            if protocol.calls and self._clock() - protocol.calls[0].sent > self.stale_s:
                # Redis has not answered the oldest call for `stale_s`: it hangs, or the
                # connection does. Drop it; the calls it held fail, the next ones reconnect.
                protocol.close(RedisConnectionError(f"Redis did not answer for {self.stale_s} s"))
            else:
                return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # concurrent first calls share one connect
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        from redis.exceptions import ConnectionError as RedisConnectionError

        loop = asyncio.get_running_loop()
        t = self.target
        try:
            if t.path is not None:
                _, protocol = await loop.create_unix_connection(_Protocol, t.path)
            else:
                _, protocol = await loop.create_connection(_Protocol, t.host, t.port)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        self.connects += 1
        hello: list[Command] = []
        if t.password is not None:
            hello.append(("AUTH", t.username, t.password) if t.username else ("AUTH", t.password))
        if t.db:
            hello.append(("SELECT", t.db))
        if hello:
            try:
                replies = await self._send(protocol, hello)
            except BaseException:
                protocol.close(RedisConnectionError("the Redis handshake did not finish"))
                raise
            for reply in replies:
                if isinstance(reply, Exception):
                    protocol.close(reply)
                    raise reply
        if self._closed:  # closed while this connected: nobody would close it
            protocol.close(RedisConnectionError("the Redis link is closed"))
            raise RedisConnectionError("the Redis link is closed")
        return protocol

    def reset(self, reason: str) -> None:
        """Drop the connection (its unanswered calls fail with `reason`); the next call opens a
        new one."""
        from redis.exceptions import ConnectionError as RedisConnectionError

        if self._protocol is not None:
            self._protocol.close(RedisConnectionError(reason))
            self._protocol = None

    async def warm(self, timeout_s: float) -> bool:
        """Connect ahead of the first request (a PING); whether Redis answered within
        `timeout_s`. One that did not is left to the first look-ups' fallback."""
        from app.redislink import redis_trouble

        try:
            async with asyncio.timeout(timeout_s):
                await self.execute([("PING",)])
        except redis_trouble():
            return False
        return True

    async def aclose(self) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        self._closed = True
        if self._protocol is not None:
            self._protocol.close(RedisConnectionError("the Redis link is closed"))
            self._protocol = None


def reset_after_timeout(used: Sequence[RespLink], exc: BaseException, call: str) -> None:
    """After `exc` ended `call` (a look-up, a rate check...) on the links in `used`: a deadline
    that ran out may mean a connection gone silent (a partition, a frozen host, which leave it
    open), so each is dropped and the next call opens another."""
    if isinstance(exc, TimeoutError):
        for link in used:
            link.reset(f"{call} timed out on this connection")


class ClusterLinks:
    """One lean link per Redis Cluster node. Which node serves a key comes from redis-py's slot
    map, which the ownership store re-reads after a cluster failure or a redirection
    (`RedisStore.heal`). A MOVED or an ASK is followed once (`RespLink.execute`); a lost node
    fails the call like any Redis error: memory answers for `REDIS_RETRY_S` meanwhile."""

    def __init__(self, cluster: RedisCluster, template: RespTarget) -> None:
        self._cluster = cluster
        self._template = template
        # Set by the ownership store to its healer's trigger: a slot that moved (resharding)
        # makes it re-read the slot map, off the request path.
        self.on_redirect: Callable[[], None] | None = None
        self._links: dict[tuple[str, int], RespLink] = {}
        self._closed = False

    async def on(self, key: str) -> RespLink:
        await self._cluster.initialize()  # the slot map, read once (a no-op once it is)
        node = self._cluster.get_node_from_key(key)  # SlotNotCoveredError: a cluster failure
        if node is None:
            from redis.exceptions import SlotNotCoveredError

            raise SlotNotCoveredError(f"no node serves {key!r}")
        return self.on_node(node.host, int(node.port))

    def on_node(self, host: str, port: int) -> RespLink:
        from redis.exceptions import ConnectionError as RedisConnectionError

        if self._closed:
            raise RedisConnectionError("the Redis links are closed")
        link = self._links.get((host, port))
        if link is None:
            self._prune()
            link = self._links[(host, port)] = RespLink(
                replace(self._template, host=host, port=port),
                on_redirect=self._redirected,
                follow=self.on_node,
            )
        return link

    def _redirected(self) -> None:
        if self.on_redirect is not None:
            self.on_redirect()

    def _prune(self) -> None:
        """Close the links of nodes the slot map no longer has (after failovers), so that their
        count stays that of the cluster's nodes."""
        known = {(n.host, n.port) for n in self._cluster.get_nodes()}
        for address in [a for a in self._links if a not in known]:
            self._links.pop(address).reset("the node left the cluster's slot map")

    async def warm(self, timeout_s: float) -> bool:
        """Connect to every primary ahead of the first request; whether all answered."""
        from app.redislink import redis_trouble

        try:
            nodes = self._cluster.get_primaries()
            links = [self.on_node(n.host, int(n.port)) for n in nodes]
        except redis_trouble():
            return False
        answers = await asyncio.gather(*(link.warm(timeout_s) for link in links))
        return bool(answers) and all(answers)

    async def aclose(self) -> None:
        self._closed = True
        for link in self._links.values():
            await link.aclose()
        self._links.clear()
