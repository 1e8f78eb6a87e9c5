"""A private redis-server on a free loopback port (tests that stop and restart Redis, the
overhead bench's scaling run when no Redis answers), a private Redis Cluster (3 masters and 3
replicas on loopback), and a PING that needs no client library."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.ports import free_port
from harness.process import ChildServer


def redis_answers(url: str, timeout_s: float = 1.0, *, locked_ok: bool = False) -> bool:
    """Whether a Redis at ``redis://host:port/db`` answers PING (or, `locked_ok`, asks for a
    password: it is up)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[2]
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(16)
    except (OSError, ValueError):
        return False
    return reply.startswith(b"+PONG") or (locked_ok and reply.startswith(b"-NOAUTH"))


class PrivateRedis(ChildServer):
    """redis-server with no persistence; ``PrivateRedis(port=p)`` restarts one on the same port;
    `extra` adds arguments (``--requirepass``, ``--unixsocket``, ...)."""

    def __init__(
        self, port: int | None = None, *, log_dir: Path | None = None, extra: Sequence[str] = ()
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = port or free_port()
        folder = tempfile.mkdtemp(prefix="kvroute-redis-")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", folder, *extra]
        super().__init__("redis", argv, port=port, log_dir=log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def is_ready(self) -> bool:
        return redis_answers(self.url, 0.2, locked_ok=True)


@contextlib.contextmanager
def redis_or_private(url: str, log_dir: Path | None = None) -> Iterator[str | None]:
    """``url`` when it answers, else a private redis-server's URL, else None (not installed)."""
    if redis_answers(url):
        yield url
        return
    if shutil.which("redis-server") is None:
        yield None
        return
    with PrivateRedis(log_dir=log_dir) as private:
        yield private.url


# The cluster bus listens on port + 10000 and a node refuses a bus port above 65535: pick the
# client ports low enough, and check both are free.
CLUSTER_PORTS = range(20000, 45000)
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` distinct ports in `CLUSTER_PORTS` whose bus ports (+10000) are free too."""
    rng = rng or random.Random()
    ports: list[int] = []
    for _ in range(2000):
        port = rng.choice(CLUSTER_PORTS)
        if port not in ports and _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free port pairs (P, P+{BUS_OFFSET}) in {CLUSTER_PORTS}")


class ClusterNode(ChildServer):
    """One redis-server with `--cluster-enabled yes`, its state file in a directory of its own."""

    def __init__(self, port: int, *, node_timeout_ms: int, log_dir: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        folder = tempfile.mkdtemp(prefix=f"kvroute-cluster-{port}-")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--cluster-enabled", "yes"]
        argv += [
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # A replica may take over however long ago it last heard from its master (a test may
            # stop a master soon after the cluster formed).
            "--cluster-replica-validity-factor",
            "0",
        ]
        super().__init__("redis-cluster-node", argv, port=port, cwd=folder, log_dir=log_dir)
        self.node_port = port

    def is_ready(self) -> bool:
        return redis_answers(f"redis://127.0.0.1:{self.node_port}", 0.2)


def cluster_command(port: int, *args: str) -> str:
    """One CLUSTER subcommand's text answer from the node on `port`."""
    import redis

    client: Any = redis.Redis(port=port, socket_timeout=1.0)
    try:
        answer = client.execute_command("CLUSTER", *args)
    finally:
        client.close()
    return answer.decode() if isinstance(answer, bytes) else str(answer)


class PrivateRedisCluster:
    """A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, created with
    `redis-cli --cluster create`. ``with PrivateRedisCluster() as cluster:`` starts and stops it;
    `stop_master()` stops one master so that its replica is promoted."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 2000,
        log_dir: Path | None = None,
    ) -> None:
        self.replicas = replicas
        self.nodes = [
            ClusterNode(port, node_timeout_ms=node_timeout_ms, log_dir=log_dir)
            for port in cluster_ports(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """A node's URL: the cluster client discovers the others (database 0, the only one)."""
        return f"redis://127.0.0.1:{self.live_nodes()[0].node_port}"

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.exit_code() is None]

    def start(self, timeout_s: float = 60.0) -> PrivateRedisCluster:
        deadline = time.monotonic() + timeout_s
        try:
            for node in self.nodes:
                node.start(timeout_s=max(deadline - time.monotonic(), 1.0))
            self._create(max(deadline - time.monotonic(), 1.0))
            self.wait_ok(max(deadline - time.monotonic(), 1.0))
            while not self._replicas_synced():  # so that a stopped master loses nothing
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster replicas not in sync after {timeout_s} s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout_s: float) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
        argv = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}")

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots, as a live node sees them."""
        lines = cluster_command(self.live_nodes()[0].node_port, "NODES").splitlines()
        ports = []
        for line in lines:
            fields = line.split()
            flags = fields[2].split(",")
            if "master" in flags and "fail" not in flags and len(fields) > 8:
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def is_ok(self) -> bool:
        """Every live node says `cluster_state:ok` and sees every slot served by a live master."""
        from redis import RedisError

        live = {n.node_port for n in self.live_nodes()}
        for port in live:
            try:
                if "cluster_state:ok" not in cluster_command(port, "INFO"):
                    return False
            except (RedisError, OSError):
                return False
        masters = self.masters()
        return len(masters) == len(self.nodes) // (1 + self.replicas) and set(masters) <= live

    def _replicas_synced(self) -> bool:
        import redis

        synced = 0
        for node in self.live_nodes():
            client = redis.Redis(port=node.node_port, socket_timeout=1.0)
            try:
                info = client.info("replication")
            finally:
                client.close()
            synced += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return synced == len(self.nodes) - len(self.nodes) // (1 + self.replicas)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok after {timeout_s:.0f} s")
            time.sleep(0.1)

    def stop_master(self, port: int | None = None) -> int:
        """Stop one master (the first, or `port`): its replica is promoted after the node timeout."""
        port = port or self.masters()[0]
        next(n for n in self.nodes if n.node_port == port).stop()
        return port

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> PrivateRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
