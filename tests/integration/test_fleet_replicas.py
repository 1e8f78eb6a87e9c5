"""Two (then three) router processes sharing the real Redis agree on the fleet."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import running_simulators, wait_for
from tests.integration.router_process import RouterProcess

pytestmark = pytest.mark.redis

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
VERSION_KEY = "kvroute:{fleet}:version"


def states(url: str) -> dict[str, str]:
    resp = httpx.get(f"{url}/admin/backends", headers=AUTH, timeout=5)
    assert resp.status_code == 200
    return {b["name"]: b["state"] for b in resp.json()["data"]}


def test_a_change_through_one_replica_reaches_the_others(redis_url: str) -> None:
    with running_simulators(3) as sims:
        env: dict[str, Any] = {
            "BACKEND_URLS": f"{sims[0].url},{sims[1].url}",
            "SERVED_MODEL": "sim-model",
            "REDIS_URL": redis_url,
            "REDIS_TIMEOUT_S": "0.5",
            "ADMIN_API_KEY": ADMIN,
            "DRAIN_TIMEOUT_S": "5",
        }
        with RouterProcess(env) as a, RouterProcess(env) as b:
            # Added through A: B has it within a second, and it serves there.
            resp = httpx.post(f"{a.url}/admin/backends", json={"url": sims[2].url}, headers=AUTH)
            assert resp.status_code == 201
            added_s = time.monotonic()
            # "Within about a second": polled every 0.25 s; 2 s leaves room for a loaded CI box.
            wait_for(lambda: "b2" in states(b.url), timeout_s=2.0)
            print(f"\nreplica B saw the add after {time.monotonic() - added_s:.3f} s")
            wait_for(lambda: states(b.url).get("b2") == "serving", timeout_s=3)
            # The same URL through B is a conflict (the membership is shared).
            again = httpx.post(f"{b.url}/admin/backends", json={"url": sims[2].url}, headers=AUTH)
            assert again.status_code == 409

            # Drained through B: A stops using it within a second and removes it.
            assert httpx.delete(f"{b.url}/admin/backends/b0", headers=AUTH).status_code == 202
            drained_s = time.monotonic()
            wait_for(lambda: states(a.url).get("b0") in (None, "draining"), timeout_s=2.0)
            print(f"replica A saw the drain after {time.monotonic() - drained_s:.3f} s")
            wait_for(lambda: "b0" not in states(a.url), timeout_s=3)

            # A replica started later reads the current fleet, not its BACKEND_URLS alone.
            with RouterProcess(env) as c:
                wait_for(lambda: states(c.url) == {"b1": "serving", "b2": "serving"}, timeout_s=3)
                # Cut through C: gone everywhere.
                cut = httpx.delete(f"{c.url}/admin/backends/b1?drain=false", headers=AUTH)
                assert cut.status_code == 200
                for replica in (a, b, c):
                    wait_for(lambda r=replica: "b1" not in states(r.url), timeout_s=2.0)
                models = httpx.get(f"{a.url}/v1/models").json()["data"]
                assert [m["id"] for m in models] == ["sim-model"]
                answer = httpx.post(
                    f"{b.url}/v1/chat/completions",
                    json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert answer.status_code == 200
                assert answer.headers["x-router-backend"] == "b2"
            # Redis losing the membership (flushed) drains nothing: a replica writes it again.
            redis.Redis.from_url(redis_url).flushdb()
            wait_for(lambda: redis.Redis.from_url(redis_url).exists(VERSION_KEY), timeout_s=2)
            time.sleep(0.6)  # (two polls: a wrongful drain would show by now)
            for replica in (a, b):
                assert states(replica.url) == {"b2": "serving"}
            prom = httpx.get(f"{a.url}/metrics", headers={"Accept": "text/plain"}).text
            assert 'kvroute_fleet_changes_total{action="add"} 1.0' in prom
            assert 'kvroute_fleet_changes_total{action="cut"} 1.0' in prom
