"""Real vLLM servers for tests/realvllm: built once per machine, started once per test run.

Every test here gets the `realvllm` marker (deselect with `-m "not realvllm"`). Nothing is
skipped: a missing torch +cpu wheel or a server that does not start fails the tests, loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, emptied_redis
from tools.realvllm import RealVllmServers, serving_pair

HERE = Path(__file__).resolve().parent
_STARTED: list[RealVllmServers] = []  # for the terminal summary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.realvllm)


# A database apart from the default suite's: every Redis test empties its database first, so a
# default run beside this one (a second checkout, a helper) would wipe records mid-test.
# Same server as the default suite's (KVROUTE_TEST_REDIS_URL), database 12.
REALVLLM_REDIS_URL = os.environ.get(
    "KVROUTE_TEST_REALVLLM_REDIS_URL", REDIS_URL.rsplit("/", 1)[0] + "/12"
)


@pytest.fixture
def redis_url() -> str:
    return emptied_redis(REALVLLM_REDIS_URL)


@pytest.fixture(scope="session")
def real_vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllmServers]:
    """Two real vLLM servers (the second with --max-num-seqs 4) serving the tiny model."""
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    with serving_pair(log_dir=log_dir, timeout_s=420.0) as servers:
        _STARTED.append(servers)
        yield servers


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for servers in _STARTED:
        terminalreporter.write_line(
            f"real vLLM: {len(servers.urls)} servers healthy in {servers.start_s:.0f} s "
            f"(logs: {', '.join(str(p) for p in servers.log_paths)})"
        )
