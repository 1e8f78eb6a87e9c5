"""`--register`: the deploy tool's calls to a running router's admin API (a real router and
simulators on loopback)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.deploy import RegisterError, UsageError
from app.deploy.register import RouterAdmin, admin_key, backend_name
from app.deploy.spec import SshTarget
from tests.conftest import running_router, running_simulators, wait_for
from tests.integration.fleet_load import Load

KEY = "admin-secret"


def test_admin_key_comes_from_the_environment_only() -> None:
    assert admin_key({"KVROUTE_ADMIN_API_KEY": "a", "ADMIN_API_KEY": "b"}) == "a"
    assert admin_key({"ADMIN_API_KEY": "b"}) == "b"
    with pytest.raises(UsageError, match="admin key"):
        admin_key({})


@pytest.mark.parametrize(
    ("target", "port", "name"),
    [("root@gpu1", 8000, "gpu1-8000"), ("me@[2001:db8::1]:22", 8001, "2001-db8-1-8001")],
)
def test_backend_name(target: str, port: int, name: str) -> None:
    assert backend_name(SshTarget.parse(target), port) == name


def test_register_then_drain_under_load_both_idempotent() -> None:
    with (
        running_simulators(2, decode_tokens_per_s=60, base_ttft_s=0.002) as sims,
        running_router([sims[0].url], served_model="sim-model", admin_api_key=KEY) as router,
    ):
        admin = RouterAdmin(router.url, KEY)
        url = sims[1].url
        assert asyncio.run(admin.register(url, "gpu1-8000")) == "registered as gpu1-8000"
        assert asyncio.run(admin.wait_serving("gpu1-8000", 5))
        again = asyncio.run(admin.register(url, "gpu1-8000"))
        assert again.startswith("already registered as gpu1-8000")
        with pytest.raises(RegisterError, match="not gpu2-8000"):
            asyncio.run(admin.register(url, "gpu2-8000"))
        backend = router.router.pool.get("gpu1-8000")
        with Load(router.url, workers=6) as load:
            wait_for(lambda: backend.dispatched > 3)
            done = asyncio.run(admin.drain("gpu1-8000", 30))
            assert done.startswith("gpu1-8000 drained")
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 10)
        assert load.failed() == []
        assert asyncio.run(admin.drain("gpu1-8000", 30)) == "gpu1-8000 not registered"
        assert [b.name for b in router.router.pool.backends] == ["b0"]


def test_register_errors_name_their_fix() -> None:
    with (
        running_simulators(1) as sims,
        running_router([sims[0].url], served_model="sim-model", admin_api_key=KEY) as router,
    ):
        with pytest.raises(RegisterError) as info:
            asyncio.run(RouterAdmin(router.url, "wrong").register("http://127.0.0.1:9", "x"))
        assert "401" in info.value.message
        assert "ADMIN_API_KEY" in info.value.fix
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RegisterError, match="unreachable"):
        asyncio.run(RouterAdmin(dead, KEY, timeout_s=2).drain("x", 1))
