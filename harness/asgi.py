"""An ASGI app under uvicorn in a daemon thread of this process, with its own event loop, on a
loopback socket bound at construction (port 0: the kernel picks a free one, no race).

The router in tests (``tests/conftest.RouterServer``) and in-thread simulators run through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn

from app.simulator.runner import bind_socket, event_loop_factory

HOST = "127.0.0.1"


def uvicorn_server(app: object, **config: object) -> uvicorn.Server:
    """uvicorn as the router runs it (httptools, lifespan on), quiet."""
    options: dict[str, object] = {
        "http": "httptools",
        "ws": "none",
        "lifespan": "on",
        "log_level": "warning",
        "access_log": False,
        **config,
    }
    return uvicorn.Server(uvicorn.Config(app, **options))  # type: ignore[arg-type]


class ThreadedServer:
    """``server`` serving from a daemon thread; ``with ThreadedServer(server) as s: s.url``."""

    def __init__(self, server: uvicorn.Server, *, host: str = HOST, port: int = 0) -> None:
        self.server = server
        self.host = host
        self._socket = bind_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Self:
        """Serve; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._run, name=f"asgi-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server on port {self.port} not serving after {timeout_s} s")
            time.sleep(0.002)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut down (lifespan shutdown runs) and join the thread; force after ``timeout_s``.

        A server still running after that fails the caller: a shutdown that hangs (a background
        task that ignores its cancellation) would otherwise leave a live server behind, still
        probing its backends, for every later test in the process to share a CPU with."""
        thread, loop = self._thread, self._loop
        if thread is not None:
            if loop is not None and thread.is_alive():
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(setattr, self.server, "should_exit", True)
            thread.join(timeout_s)
            if thread.is_alive() and loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(setattr, self.server, "force_exit", True)
                thread.join(timeout_s)
            self._thread = None
        self._socket.close()
        if thread is not None and thread.is_alive():
            raise RuntimeError(
                f"server on port {self.port} still running {2 * timeout_s:g} s after it was "
                "asked to stop: its shutdown hangs"
            )

    def _run(self) -> None:
        loop = event_loop_factory()()  # uvloop, as in production (it sets TCP_NODELAY)
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.serve(sockets=[self._socket]))
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
