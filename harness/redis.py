"""A private redis-server on a free loopback port (tests that stop and restart Redis, the
overhead bench's scaling run when no Redis answers), and a PING that needs no client library."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.ports import free_port
from harness.process import ChildServer


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis at ``redis://host:port/db`` answers PING."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except (OSError, ValueError):
        return False


class PrivateRedis(ChildServer):
    """redis-server with no persistence; ``PrivateRedis(port=p)`` restarts one on the same port."""

    def __init__(self, port: int | None = None, *, log_dir: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = port or free_port()
        folder = tempfile.mkdtemp(prefix="kvroute-redis-")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", folder]
        super().__init__("redis", argv, port=port, log_dir=log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def is_ready(self) -> bool:
        return redis_answers(self.url, 0.2)


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
