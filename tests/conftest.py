"""Shared fixtures: the router as a real server on a loopback port, in front of simulators."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from app.api import create_app
from app.config import Settings
from app.listener import protocol_for
from app.simulator.config import SimConfig
from app.simulator.runner import SimulatorServer


class RouterServer:
    """The router app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            http=protocol_for(settings),  # type: ignore[arg-type]
            loop="uvloop",  # sets TCP_NODELAY on accepted sockets; asyncio does not here
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router(self) -> Any:
        """The app's collaborators (`Services`): pool, metrics, admission, store..."""
        return self.app.services

    def start(self) -> RouterServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("router did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


@contextmanager
def running_router(backend_urls: list[str], **overrides: Any) -> Iterator[RouterServer]:
    params: dict[str, Any] = {
        "backend_urls": backend_urls,
        "health_interval_s": 0.2,
        "metrics_interval_s": 0.2,
        "_env_file": None,
    }
    params.update(overrides)
    server = RouterServer(Settings(**params)).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_simulators(n: int, **config: Any) -> Iterator[list[SimulatorServer]]:
    sims = [SimulatorServer(SimConfig(**{"model": "sim-model", **config})) for _ in range(n)]
    try:
        for sim in sims:
            sim.start()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def missing_service(reason: str) -> None:
    """A service a test needs is absent: a failure in CI (KVROUTE_REQUIRE_SERVICES=1), else a skip."""
    if os.environ.get("KVROUTE_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def wait_for(condition: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@pytest.fixture
def sims() -> Iterator[list[SimulatorServer]]:
    with running_simulators(
        3, base_ttft_s=0.001, prefill_s_per_token=0.0, decode_tokens_per_s=2000.0
    ) as s:
        yield s


@pytest.fixture
def router(sims: list[SimulatorServer]) -> Iterator[RouterServer]:
    with running_router([s.url for s in sims], served_model="sim-model") as r:
        yield r


REDIS_URL = os.environ.get("KVROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
def redis_url() -> str:
    """A real Redis database of the tests' own (KVROUTE_TEST_REDIS_URL), emptied first."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).flushdb()
    except redis.ConnectionError as exc:
        missing_service(f"no Redis at {REDIS_URL} ({exc}); start one or set KVROUTE_TEST_REDIS_URL")
    return REDIS_URL
