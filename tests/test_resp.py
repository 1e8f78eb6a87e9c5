"""RespLink against a real Redis (db 13 by default), a private one with passwords or a unix socket,
and loopback servers that hang or talk nonsense."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from app.ownership import RedisStore
from app.prefix import PrefixKeys
from app.rates import RedisRateLimits
from app.redislink import redis_client
from app.resp import ClusterLinks, RespLink, RespTarget, encode, redirect_of, target_of
from tests.conftest import private_redis

pytestmark = pytest.mark.redis


def target(url: str) -> RespTarget:
    found = target_of(redis_client(url, 0.5))
    assert found is not None
    return found


@contextlib.asynccontextmanager
async def link_to(url: str, **kwargs: float) -> AsyncIterator[RespLink]:
    link = RespLink(target(url), **kwargs)  # type: ignore[arg-type]
    try:
        yield link
    finally:
        await link.aclose()


@contextlib.asynccontextmanager
async def loopback_server(
    on_data: Callable[[asyncio.StreamWriter, bytes], None],
) -> AsyncIterator[str]:
    """A TCP server on loopback that hands what it reads to `on_data`; its `redis://` URL."""

    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    on_data(writer, data)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers)


@pytest.mark.parametrize(
    ("reply", "node"),
    [
        ("MOVED 3999 10.0.0.5:7001", ("MOVED", "10.0.0.5", 7001)),
        ("MOVED 3999 :7001", ("MOVED", "10.0.0.9", 7001)),  # the same host as the node asked
        ("MOVED 3999 ::1:7001", ("MOVED", "::1", 7001)),
        ("ASK 3999 10.0.0.5:7001", ("ASK", "10.0.0.5", 7001)),
        ("TRYAGAIN Multiple keys request during rehashing of slot", None),
        ("WRONGTYPE Operation against a key", None),
        ("MOVED 3999 10.0.0.5:port", None),
    ],
)
def test_the_node_a_redirection_names(reply: str, node: tuple[str, str, int] | None) -> None:
    assert redirect_of(ResponseError(reply), "10.0.0.9") == node


def test_commands_are_encoded_as_resp_arrays_of_bulk_strings() -> None:
    assert encode([("GET", "k"), ("SELECT", 13), (b"HGETALL", "é")]) == (
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        b"*2\r\n$6\r\nSELECT\r\n$2\r\n13\r\n"
        b"*2\r\n$7\r\nHGETALL\r\n$2\r\n\xc3\xa9\r\n"
    )


def test_only_clients_it_can_copy_get_a_target() -> None:
    assert target_of(redis_client("redis://u:p@10.0.0.5:6380/3", 0.5)) == RespTarget(
        host="10.0.0.5", port=6380, db=3, username="u", password="p"
    )
    assert target_of(redis_client("unix:///tmp/r.sock?db=2", 0.5)) == RespTarget(
        path="/tmp/r.sock", db=2
    )
    assert target_of(redis_client("rediss://10.0.0.5:6380/0", 0.5)) is None  # TLS: redis-py
    assert target_of(object()) is None  # (a cluster client, say)


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    redis_url: str,
) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.mset({f"k{i}": f"v{i}" for i in range(200)})
    sync.hset("h", mapping={"a": "1", "b": "2"})
    async with link_to(redis_url) as link:
        replies = await asyncio.gather(
            *(link.execute([("GET", f"k{i}"), ("HGETALL", "h")]) for i in range(200))
        )
        assert replies == [[f"v{i}".encode(), [b"a", b"1", b"b", b"2"]] for i in range(200)]
        assert await link.execute([("GET", "missing")]) == [None]
        assert link.connects == 1


async def test_a_caller_that_leaves_does_not_shift_the_others_replies(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set("after", "mine")
    async with link_to(redis_url) as link:
        # BLPOP holds the connection 0.3 s; its caller leaves after 0.05 s, and the call behind
        # it must still get its own reply, not BLPOP's.
        leaving = asyncio.create_task(link.execute([("BLPOP", "nothing", "0.3")]))
        await asyncio.sleep(0.05)
        behind = asyncio.create_task(link.execute([("GET", "after")]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        assert await behind == [b"mine"]
        assert leaving.cancelled()
        assert await link.execute([("PING",)]) == [b"PONG"]
        assert link.connects == 1


async def test_an_error_reply_is_raised_and_the_link_goes_on(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set("s", "string")
    async with link_to(redis_url) as link:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await link.execute([("GET", "s"), ("HGETALL", "s")])
        assert await link.execute([("GET", "s")]) == [b"string"]


async def test_a_lost_connection_fails_its_calls_and_the_next_call_reconnects(
    redis_url: str,
) -> None:
    sync = redis.Redis.from_url(redis_url)
    async with link_to(redis_url) as link:
        await link.execute([("CLIENT", "SETNAME", "kvroute-resp-test")])
        waiting = asyncio.create_task(link.execute([("BLPOP", "nothing", "5")]))
        await asyncio.sleep(0.05)
        killed = [c["id"] for c in sync.client_list() if c["name"] == "kvroute-resp-test"]
        assert len(killed) == 1
        sync.client_kill_filter(_id=killed[0])
        with pytest.raises((RedisConnectionError, OSError)):
            await waiting
        assert await link.execute([("PING",)]) == [b"PONG"]
        assert link.connects == 2


async def test_a_hung_redis_is_dropped_after_stale_s_and_unanswered_calls_are_bounded() -> None:
    async with (
        loopback_server(lambda writer, data: None) as url,  # reads, never answers
        link_to(url, stale_s=0.2, max_pending=3) as link,
    ):
        calls = [asyncio.create_task(link.execute([("PING",)])) for _ in range(3)]
        await asyncio.sleep(0.02)
        with pytest.raises(RedisConnectionError, match="3 Redis calls already unanswered"):
            await link.execute([("PING",)])
        await asyncio.sleep(0.25)
        # The next call finds the oldest one unanswered for longer than stale_s: the
        # connection is dropped, its calls fail, and this one goes out on a new connection.
        late = asyncio.create_task(link.execute([("PING",)]))
        for call in calls:
            with pytest.raises(RedisConnectionError, match=r"did not answer for 0\.2 s"):
                await call
        await asyncio.sleep(0.02)
        assert link.connects == 2
        late.cancel()


async def test_a_server_that_talks_nonsense_fails_the_call() -> None:
    def nonsense(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with loopback_server(nonsense) as url, link_to(url) as link:
        with pytest.raises(InvalidResponse, match="Protocol error"):  # as redis-py raises
            await link.execute([("PING",)])
        with pytest.raises(InvalidResponse):  # a new connection, the same nonsense
            await link.execute([("PING",)])
        assert link.connects == 2


async def test_nothing_listening_is_a_connection_error() -> None:
    async with (
        loopback_server(lambda writer, data: None) as url,
    ):
        pass  # the port is free again
    async with link_to(url) as link:
        with pytest.raises(RedisConnectionError, match="cannot connect to Redis"):
            await link.execute([("PING",)])


@pytest.mark.parametrize(
    ("extra", "url"),
    [
        (("--requirepass", "s3cret"), "redis://:s3cret@127.0.0.1:{port}/5"),
        (("--user", "alice", "on", ">pw", "~*", "+@all"), "redis://alice:pw@127.0.0.1:{port}/5"),
    ],
)
async def test_a_password_and_a_database_are_honoured(extra: tuple[str, ...], url: str) -> None:
    server = private_redis(*extra)
    try:
        url = url.format(port=server.port)
        redis.Redis.from_url(url).set("where", "db5")
        async with link_to(url) as link:
            assert await link.execute([("GET", "where")]) == [b"db5"]
        wrong = url.replace("s3cret", "nope").replace(":pw@", ":nope@")
        async with link_to(wrong) as link:
            with pytest.raises(ResponseError, match=r"WRONGPASS|invalid"):
                await link.execute([("GET", "where")])
    finally:
        server.stop()


async def test_a_unix_socket() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="kvroute-resp-"), "redis.sock")
    server = private_redis("--unixsocket", path)
    try:
        async with link_to(f"unix://{path}?db=2") as link:
            await link.execute([("SET", "u", "1")])
            assert await link.execute([("GET", "u")]) == [b"1"]
        assert redis.Redis(unix_socket_path=path, db=2).get("u") == b"1"
    finally:
        server.stop()


async def test_a_closed_link_refuses_and_leaves_no_unread_failures(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    link = RespLink(target(redis_url))
    assert await link.warm(1.0)
    waiting = asyncio.create_task(link.execute([("BLPOP", "nothing", "5")]))
    await asyncio.sleep(0.05)
    await link.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await waiting
    with pytest.raises(RedisConnectionError, match="closed"):
        await link.execute([("PING",)])
    assert not await link.warm(1.0)
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


class OneNodeCluster:
    """What `ClusterLinks` reads of redis-py's cluster client: every slot on one node."""

    def __init__(self, port: int) -> None:
        self.node = SimpleNamespace(host="127.0.0.1", port=port)

    async def initialize(self) -> None:
        pass

    def get_node_from_key(self, key: str) -> SimpleNamespace:
        return self.node

    def get_nodes(self) -> list[SimpleNamespace]:
        return [self.node]


async def test_a_resharded_slot_has_the_slot_map_read_again(redis_url: str) -> None:
    """A MOVED is followed once; one that moves again fails the call (memory or the local
    buckets answer it) and, from a rate check too, triggers the ownership store's re-read of the
    slot map."""

    port = 0

    def moved(writer: asyncio.StreamWriter, data: bytes) -> None:  # to itself, again and again
        writer.write(b"-MOVED 3999 127.0.0.1:%d\r\n" % port * data.count(b"*"))

    async with loopback_server(moved) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        links = ClusterLinks(OneNodeCluster(port), RespTarget())  # type: ignore[arg-type]
        store = RedisStore(
            redis_client(redis_url, 0.5), redis_url, ttl_s=60, timeout_s=0.5, retry_s=5, links=links
        )
        limits = RedisRateLimits(redis_client(redis_url, 0.5), 10, 0, timeout_s=0.5, links=links)
        await limits.check("t", 1)
        assert limits.fallbacks == 1
        assert store._topology_stale.is_set()
        store._topology_stale.clear()
        found = await store.lookup(
            PrefixKeys(conversation="c", system="s", prompt_chars=0, system_chars=0)
        )
        assert found.owner is None
        assert store.fallback_causes["cluster"] == 1
        assert "MOVED 3999" in store.last_error
        assert store._topology_stale.is_set()
        await links.aclose()


async def test_an_ask_is_followed_for_the_commands_it_names_with_asking_before_each() -> None:
    """A slot mid-migration: the keys that have left are answered ASK, those still here are
    answered here. Only the former go to the importing node, each after an ASKING (it admits only
    the next command); the replies come back in order, and a second redirection fails the call."""
    importing_port = 0
    received = bytearray()

    def migrating(writer: asyncio.StreamWriter, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if line == b"GET":  # gone: ask the importing node
                writer.write(b"-ASK 3999 127.0.0.1:%d\r\n" % importing_port)
            elif line == b"HGETALL":  # still here
                writer.write(b"*2\r\n$2\r\nb2\r\n$1\r\n7\r\n")
            elif line == b"SET":
                writer.write(b"-ASK 3999 127.0.0.1:%d\r\n" % importing_port)

    def importing(writer: asyncio.StreamWriter, data: bytes) -> None:
        received.extend(data)
        for line in data.split(b"\r\n"):
            if line == b"ASKING":
                writer.write(b"+OK\r\n")
            elif line == b"GET":
                writer.write(b"$2\r\nv1\r\n")
            elif line == b"SET":  # redirected again
                writer.write(b"-ASK 3999 127.0.0.1:1\r\n")

    async with loopback_server(importing) as there, loopback_server(migrating) as here:
        importing_port = int(there.rsplit(":", 1)[1].split("/")[0])
        here_port = int(here.rsplit(":", 1)[1].split("/")[0])
        links = ClusterLinks(OneNodeCluster(here_port), RespTarget())  # type: ignore[arg-type]
        redirections: list[None] = []
        links.on_redirect = lambda: redirections.append(None)
        link = await links.on("k")
        replies = await link.execute([("GET", "k"), ("HGETALL", "s"), ("GET", "j")])
        assert replies == [b"v1", [b"b2", b"7"], b"v1"]
        assert received == encode([("ASKING",), ("GET", "k"), ("ASKING",), ("GET", "j")])
        assert redirections  # (an ASK, too, has the slot map read again)
        with pytest.raises(ResponseError, match=r"^ASK 3999 127\.0\.0\.1:1$"):  # followed once
            await link.execute([("SET", "k", "v")])
        await links.aclose()


async def test_a_call_that_times_out_after_a_moved_drops_the_link_it_followed(
    redis_url: str,
) -> None:
    """A MOVED to a node that then says nothing: the look-up and the rate check time out, and
    drop the followed node's connection too, so the next call opens another one rather than
    queue behind the silent one until `stale_s`."""

    silent_port = 0

    def moved(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"-MOVED 3999 127.0.0.1:%d\r\n" % silent_port * data.count(b"*"))

    async with loopback_server(lambda writer, data: None) as silent, loopback_server(moved) as url:
        silent_port = int(silent.rsplit(":", 1)[1].split("/")[0])
        moved_port = int(url.rsplit(":", 1)[1].split("/")[0])
        links = ClusterLinks(OneNodeCluster(moved_port), RespTarget())  # type: ignore[arg-type]
        client = redis_client(redis_url, 0.5)
        store = RedisStore(client, redis_url, ttl_s=60, timeout_s=0.1, retry_s=0, links=links)
        limits = RedisRateLimits(client, 10, 0, timeout_s=0.1, links=links)
        keys = PrefixKeys(conversation="c", system="s", prompt_chars=0, system_chars=0)
        for attempt in (1, 2):
            assert (await store.lookup(keys)).owner is None  # (memory answered)
            followed = links.on_node("127.0.0.1", silent_port)  # the link the MOVED led to
            assert store.fallback_causes["timeout"] == attempt
            assert followed.connects == 2 * attempt - 1  # a new connection for each call
            await limits.check("t", 1)
            assert limits.fallbacks == attempt
            assert followed.connects == 2 * attempt
        await links.aclose()
