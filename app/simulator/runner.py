"""The product's way to run a simulator as a child process (`kvroute demo`); tests and benches
use `harness/` (its in-thread `SimulatorThread` is built on this module's `UvicornServer`).

`SimulatorProcess` runs `python -m app.simulator` in a new
process group, so the simulated backend does not share the router's CPU and GIL. `UvicornServer`,
`bind_socket` and `event_loop_factory` are shared with `python -m app.simulator` and the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import uvicorn

from app.simulator.config import SimConfig, config_to_argv
from app.simulator.server import SimulatorApp

LISTENING_PREFIX = "KVROUTE_SIMULATOR_LISTENING "
_INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


class _QuietDroppedStreams(logging.Filter):
    """Streams the simulator cuts on purpose (failure mode, abort on shutdown) are not errors
    worth a log line. uvicorn's logger is shared by every server in the process, so only this
    server's thread is muted: a router in the same process keeps its line."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.msg != _INCOMPLETE_RESPONSE


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 lets the kernel pick a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class UvicornServer(uvicorn.Server):
    """uvicorn with two changes: in-flight generations are cut at shutdown (a stopped vLLM drops
    its streams) and signals are left to the caller."""

    def __init__(self, app: SimulatorApp, *, log_level: str = "warning") -> None:
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="on",
            log_level=log_level,
            access_log=False,
            timeout_keep_alive=5,  # vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE default
            timeout_graceful_shutdown=2,
        )
        super().__init__(config)
        self.sim_app = app
        self._quiet = _QuietDroppedStreams()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._quiet.thread = threading.get_ident()
        logger = logging.getLogger("uvicorn.error")
        logger.addFilter(self._quiet)
        try:
            await super().serve(sockets)
        finally:
            logger.removeFilter(self._quiet)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.sim_app.abort_all()
        await super().shutdown(sockets)


class SimulatorProcess:
    """`python -m app.simulator` as a child in its own process group; reads the port it chose."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.host = host
        self._argv = [
            python,
            "-m",
            "app.simulator",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            log_level,
            *config_to_argv(self.config),
            *extra_args,
        ]
        self._env = env
        self._stderr = stderr
        self._process: subprocess.Popen[str] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("simulator process not started")
        return self._url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the child; returns once it printed its listening line (it then accepts)."""
        if self._process is not None:
            raise RuntimeError("simulator process already started")
        env = dict(os.environ if self._env is None else self._env)
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._process = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
            start_new_session=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(
            target=_pump_lines, args=(self._process.stdout, lines), daemon=True
        ).start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"simulator process silent for {timeout_s} s") from None
            if line is None:
                code = self._process.wait()
                self._process = None
                raise RuntimeError(f"simulator process exited with {code} before listening")
            if line.startswith(LISTENING_PREFIX):
                self._url = line[len(LISTENING_PREFIX) :].strip()
                return

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM and wait; SIGKILL to the whole group on timeout. Returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._process = None
        return process.returncode

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _pump_lines(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    """Hand over stdout lines, then keep draining so the child never blocks on a full pipe."""
    if stream is None:
        lines.put(None)
        return
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            lines.put(line)
    lines.put(None)
