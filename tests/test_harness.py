"""harness/: a child server's failure carries its log tail, stop ends its whole process group,
and the in-thread ASGI server serves and stops."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from harness.asgi import ThreadedServer, uvicorn_server
from harness.process import ChildServer, ServerStartError, is_http_ok
from tests.conftest import wait_for


class NeverReady(ChildServer):
    def is_ready(self) -> bool:
        return False


def is_gone(pid: int) -> bool:
    """No such process, or only its zombie left for init to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def test_exit_before_ready_names_the_log_tail(tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo starting; echo 'bad flag --x' >&2; exit 3"]
    server = NeverReady("boom", argv, log_dir=tmp_path)
    with pytest.raises(ServerStartError, match="exited with code 3") as info:
        server.start(timeout_s=10)
    assert "bad flag --x" in str(info.value)
    assert str(server.log_path) in str(info.value)
    assert server.proc is None  # stopped again


def test_not_ready_in_time(tmp_path: Path) -> None:
    server = NeverReady("slow", ["sleep", "30"], log_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="not ready after"):
        server.start(timeout_s=0.3)
    assert time.monotonic() - started < 10
    assert server.proc is None


def test_stop_ends_the_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with ChildServer("tree", ["sh", "-c", script], log_dir=tmp_path) as server:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
        grandchild = int(pid_file.read_text())
        leader = server.pid
        assert leader is not None
        assert server.exit_code() is None
    assert server.proc is None
    wait_for(lambda: is_gone(grandchild))
    assert is_gone(leader)


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


def test_threaded_server_serves_then_frees_its_port() -> None:
    server = ThreadedServer(uvicorn_server(hello, lifespan="off"))
    with server:
        assert is_http_ok(server.url)
        assert httpx.get(server.url).text == "hi"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


def test_a_threaded_server_whose_shutdown_hangs_fails_its_stop() -> None:
    in_shutdown = threading.Event()

    async def stuck(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()  # startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown: a task that never ends, whatever it is asked
        in_shutdown.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    server = ThreadedServer(uvicorn_server(stuck)).start()
    # The shutdown is under way before `stop` runs: on a busy machine uvicorn could otherwise
    # take longer than the first wait to reach it, and the forced exit asked next would skip it.
    server.server.should_exit = True
    assert in_shutdown.wait(10)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"still running 0\.4 s after it was asked to stop"):
        server.stop(timeout_s=0.2)
    assert time.monotonic() - started < 2.0
