"""Client compatibility suite: common OpenAI clients and load testers, through the router.

Every test here gets the `compat` marker and runs in its own invocation
(`uv run --extra dev pytest -m compat`). Each client sends the same requests straight to a
simulated backend and through kvroute in front of two of them; the answers must match.

The simulator's text depends only on `max_tokens` (`tok0 tok1 ...`) and its prompt count only
on the prompt's bytes, so "the same answer" compares text, finish reason and prompt/completion
tokens. Cached-token counts are not compared: they depend on which backend served what before.

No client may reach past loopback: `loopback_only` refuses (and records) any name resolution
or connection to another address, and every test fails if one was tried.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from harness.simulator import SimulatorThread
from tests.conftest import RouterServer, running_router, running_simulators

HERE = Path(__file__).resolve().parent
# Async tests share one event loop per package, as an application has one: litellm and
# LangChain cache async HTTP clients process-wide, which a loop per test would strand.
# Every async test here is decorated with it.
ONE_LOOP = pytest.mark.asyncio(loop_scope="package")
MODEL = "sim-model"
FAST_SIM = {"base_ttft_s": 0.001, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 2000.0}
# What the clients would otherwise do on their own: litellm fetches a model cost map from
# GitHub at import, LangSmith traces when a key is around; Hugging Face and vLLM phone home.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Warnings litellm's own pydantic models raise on every call: not ours to fix.
_CLIENT_NOISE = (
    "ignore:Accessing the 'model_:DeprecationWarning",
    "ignore:Item .* is using the `ReadOnly` qualifier:UserWarning",
)
_UNSET_ENV = ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.compat)
            for noise in _CLIENT_NOISE:
                item.add_marker(pytest.mark.filterwarnings(noise))


# ---------------------------------------------------------------------------------------------
# Loopback only


def is_loopback(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): a local bind address
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="package", autouse=True)
def outside_attempts() -> Iterator[list[str]]:
    """Refuse and record resolution of, or connection to, anything but loopback (in this
    process: the vllm bench subprocess gets offline settings instead)."""
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback(host):
            attempts.append(f"resolve {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"compat tests: {host!r} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    def refused(sock: socket.socket, address: Any) -> bool:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            attempts.append(f"connect {address!r}")
            return True
        return False

    def connect(self: socket.socket, address: Any) -> None:
        if refused(self, address):
            raise ConnectionRefusedError(f"compat tests: {address!r} is not loopback")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if refused(self, address):
            raise ConnectionRefusedError(f"compat tests: {address!r} is not loopback")
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        for name in _UNSET_ENV:
            patch.delenv(name, raising=False)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        yield attempts


@pytest.fixture(autouse=True)
def loopback_only(outside_attempts: list[str]) -> Iterator[None]:
    yield
    assert not outside_attempts, f"a client tried to leave loopback: {outside_attempts}"


@pytest.fixture(scope="package")
def litellm(outside_attempts: list[str]) -> ModuleType:
    """The litellm SDK, imported only once the offline settings and the guard are in place."""
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


# ---------------------------------------------------------------------------------------------
# The router in front of simulated backends, and one backend to compare with


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client is pointed: `url` is the server root, `base_url` the OpenAI `/v1` base."""

    name: str
    url: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@dataclass(frozen=True, slots=True)
class Pair:
    direct: Target
    router: Target
    router_server: RouterServer


@pytest.fixture(scope="package")
def backends() -> Iterator[list[SimulatorThread]]:
    with running_simulators(2, **FAST_SIM) as sims:
        yield sims


@pytest.fixture(scope="package")
def pair(backends: list[SimulatorThread]) -> Iterator[Pair]:
    """kvroute (default settings) in front of both simulators, and the first simulator."""
    with running_router([s.url for s in backends], served_model=MODEL) as router:
        yield Pair(Target("direct", backends[0].url), Target("router", router.url), router)


def admitted_in_flight(router_url: str) -> int:
    body = httpx.get(f"{router_url}/metrics", timeout=5).json()
    return int(body["admission"]["in_flight"])
