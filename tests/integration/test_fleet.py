"""Backends join and leave a router under continuous load (simulated vLLM on loopback)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from app.backends import Backend
from tests.conftest import RouterServer, running_router, running_simulators, wait_for
from tests.integration.fleet_load import Load, sim_requests

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Streams of 12 tokens at 40 tokens/s: about 0.3 s each, so some are always open.
SLOW: dict[str, Any] = {"base_ttft_s": 0.005, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 40}


def backends(router: RouterServer) -> dict[str, dict[str, Any]]:
    resp = httpx.get(f"{router.url}/admin/backends", headers=AUTH)
    assert resp.status_code == 200
    return {b["name"]: b for b in resp.json()["data"]}


def at_rest(router: RouterServer) -> bool:
    svc = router.router
    return svc.admission.in_flight == 0 and all(b.in_flight == 0 for b in svc.pool.backends)


def owned_by(router: RouterServer, name: str) -> str:
    """A conversation (its first message) that the router placed on backend `name`."""
    for i in range(200):
        content = f"pinned conversation {i}"
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=chat(content))
        if resp.headers["x-router-backend"] == name:
            return content
    raise AssertionError(f"no conversation landed on {name}")


def chat(content: str) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": content}],
    }


def test_add_then_drain_under_load_fails_nothing() -> None:
    with (
        running_simulators(3, **SLOW) as sims,
        running_router(
            [sims[0].url, sims[1].url],
            served_model="sim-model",
            admin_api_key=ADMIN,
            drain_timeout_s=20,
        ) as router,
    ):
        pinned = owned_by(router, "b0")
        with Load(router.url, workers=8) as load:
            wait_for(lambda: load.count() >= 10)
            # Add: it serves once it answers /health and /v1/models, and gets traffic at once.
            added_s = time.monotonic()
            resp = httpx.post(
                f"{router.url}/admin/backends", json={"url": sims[2].url}, headers=AUTH
            )
            assert resp.status_code == 201
            assert resp.json()["name"] == "b2"
            assert resp.json()["state"] in ("probing", "serving")
            b2: Backend = router.router.pool.get("b2")
            wait_for(lambda: b2.state == "serving", timeout_s=2, interval_s=0.001)
            serving_s = time.monotonic()
            wait_for(lambda: b2.dispatched > 0, timeout_s=2, interval_s=0.001)
            first_s = time.monotonic()
            assert first_s - added_s < 2
            wait_for(lambda: sim_requests(sims[2].url) > 0, timeout_s=2)
            print(
                f"\nadd -> serving {serving_s - added_s:.3f} s; "
                f"serving -> first routed request <= {first_s - serving_s:.3f} s"
            )

            # Drain b0 while requests run on it: none fails, none new reaches it.
            b0: Backend = router.router.pool.get("b0")
            wait_for(lambda: b0.in_flight >= 2)
            resp = httpx.delete(f"{router.url}/admin/backends/b0", headers=AUTH)
            assert resp.status_code == 202
            assert resp.json()["state"] == "draining"
            dispatched = b0.dispatched  # every request it will ever get was dispatched by now
            open_at_drain = b0.in_flight
            wait_for(lambda: "b0" not in backends(router), timeout_s=10)
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 20)
        assert open_at_drain > 0
        assert load.failed() == [], load.failed()[:3]
        assert sim_requests(sims[0].url) == dispatched
        assert b0.in_flight == 0
        assert {o.backend for o in load.outcomes[-20:]} <= {"b1", "b2"}
        print(f"requests under load: {load.count()}, failed: {len(load.failed())}")
        wait_for(lambda: at_rest(router))
        # Its conversations continue elsewhere, as reassigned.
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=chat(pinned))
        assert resp.headers["x-router-backend"] in ("b1", "b2")
        assert resp.headers["x-router-cache-outcome"] == "reassigned"
        prom = httpx.get(f"{router.url}/metrics", headers={"Accept": "text/plain"}).text
        assert 'kvroute_fleet_changes_total{action="add"} 1.0' in prom
        assert 'kvroute_fleet_changes_total{action="drain"} 1.0' in prom
        assert 'kvroute_fleet_changes_total{action="remove"} 1.0' in prom


def test_cut_ends_its_streams_with_the_error_event_and_spares_the_others() -> None:
    with (
        running_simulators(2, **SLOW) as sims,
        running_router(
            [s.url for s in sims], served_model="sim-model", admin_api_key=ADMIN
        ) as router,
    ):
        b1: Backend = router.router.pool.get("b1")
        with Load(router.url, workers=8, max_tokens=40) as load:
            wait_for(lambda: len(b1.responses) >= 2)
            cut_s = time.monotonic()
            resp = httpx.delete(f"{router.url}/admin/backends/b1?drain=false", headers=AUTH)
            assert resp.status_code == 200
            assert "b1" not in backends(router)
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 16)
        open_then = [o for o in load.outcomes if o.started_s < cut_s < o.ended_s]
        cut = [o for o in open_then if o.backend == "b1"]
        assert cut, "no request was open on b1 when it was cut"
        for o in cut:
            assert o.stream, o  # a whole answer cut before its end is a 502 (none expected here)
            assert o.status == 200
            assert "error event" in o.detail, o.detail
        assert all(o.ok for o in load.outcomes if o.backend != "b1")
        assert all(o.ok for o in load.outcomes if o.started_s > cut_s + 0.05)
        wait_for(lambda: at_rest(router))
        assert b1.in_flight == 0
        assert b1.responses == {}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("GET", "/admin/backends", None, {}, 401, "invalid_api_key"),
        ("GET", "/admin/backends", None, {"Authorization": "Bearer client-key"}, 401, None),
        ("GET", "/admin/backends", None, {"Authorization": "Basic x"}, 401, None),
        ("POST", "/admin/backends", {"url": "http://127.0.0.1:1"}, {}, 401, None),
        ("POST", "/admin/backends", b"{not json", AUTH, 400, None),
        ("POST", "/admin/backends", [1], AUTH, 400, None),
        ("POST", "/admin/backends", {}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": 5}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "ftp://h:1"}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://"}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://h:99999"}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://h:1", "name": "a b"}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://h:1", "name": 3}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://h:1", "api_key": 3}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "http://h:1", "extra": 1}, AUTH, 400, None),
        ("POST", "/admin/backends", {"url": "SIM0"}, AUTH, 409, "conflict"),
        ("POST", "/admin/backends", {"url": "http://h:1", "name": "b0"}, AUTH, 409, "conflict"),
        ("DELETE", "/admin/backends/nope", None, AUTH, 404, "not_found"),
        ("DELETE", "/admin/backends/b0?drain=maybe", None, AUTH, 400, None),
        ("DELETE", "/admin/backends/b0", None, {}, 401, None),
        ("PUT", "/admin/backends", None, AUTH, 405, None),
    ],
)
def test_bad_admin_input_gets_its_status_and_an_openai_error(
    router_with_admin: RouterServer,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    sim0 = router_with_admin.router.pool.get("b0").url
    if body == {"url": "SIM0"}:
        body = {"url": sim0 + "/"}  # the same URL, spelt with a trailing slash
    content = body if isinstance(body, bytes) else None
    json = None if isinstance(body, bytes) else body
    resp = httpx.request(
        method, f"{router_with_admin.url}{path}", json=json, content=content, headers=headers
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    # Nothing changed.
    assert [b.name for b in router_with_admin.router.pool.backends] == ["b0"]


@pytest.fixture
def router_with_admin() -> Any:
    with (
        running_simulators(1) as sims,
        running_router(
            [sims[0].url],
            served_model="sim-model",
            admin_api_key=ADMIN,
            router_api_keys=["client-key"],
        ) as router,
    ):
        yield router


def test_admin_api_is_off_without_its_key(router: RouterServer) -> None:
    resp = httpx.get(f"{router.url}/admin/backends", headers=AUTH)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_per_backend_api_key_is_sent_and_never_shown() -> None:
    with (
        running_simulators(1, api_key="sim-secret") as sims,
        running_router([], served_model="sim-model", admin_api_key=ADMIN) as router,
    ):
        resp = httpx.post(
            f"{router.url}/admin/backends",
            json={"url": sims[0].url, "name": "gpu-1", "api_key": "sim-secret"},
            headers=AUTH,
        )
        assert resp.status_code == 201
        assert "sim-secret" not in resp.text
        wait_for(lambda: backends(router)["gpu-1"]["state"] == "serving")
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=chat("hello"))
        assert answer.status_code == 200
        assert answer.headers["x-router-backend"] == "gpu-1"
        for path in ("/admin/backends", "/health", "/metrics", "/architecture", "/dashboard/data"):
            assert "sim-secret" not in httpx.get(f"{router.url}{path}", headers=AUTH).text
        # The same URL again is a conflict; the name is free after the cut.
        again = httpx.post(f"{router.url}/admin/backends", json={"url": sims[0].url}, headers=AUTH)
        assert again.status_code == 409
        assert (
            httpx.delete(f"{router.url}/admin/backends/gpu-1?drain=false", headers=AUTH).status_code
            == 200
        )
        assert backends(router) == {}
        models = httpx.get(f"{router.url}/v1/models").json()["data"]
        assert models == []
        assert httpx.get(f"{router.url}/health").status_code == 503


def test_backends_file_edits_apply_and_a_bad_one_keeps_the_fleet_serving(tmp_path: Any) -> None:
    path = tmp_path / "backends.txt"
    with running_simulators(2, **SLOW) as sims:
        path.write_text(f"# the fleet\n{sims[0].url}\n")
        with (
            running_router([], served_model="sim-model", backends_file=str(path)) as router,
            Load(router.url, workers=6) as load,
        ):
            pool = router.router.pool
            wait_for(lambda: load.count() >= 5)
            path.write_text(f"# the fleet\n{sims[0].url}\n{sims[1].url}\n")
            wait_for(lambda: pool.by_url(sims[1].url) is not None, timeout_s=2)
            b1: Backend = pool.by_url(sims[1].url)
            wait_for(lambda: b1.dispatched > 0, timeout_s=3)
            # A bad edit: b0's line mistyped, a garbage line. Nothing is drained.
            path.write_text(
                f"# the fleet\n{sims[0].url.replace('http:', 'htp:')}\n{sims[1].url}\nzz\n"
            )
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 30)
            assert [b.state for b in pool.backends] == ["serving", "serving"]
            # Fixed, without b0: b0 drains while the load runs.
            path.write_text(f"{sims[1].url}\n")
            wait_for(lambda: pool.by_url(sims[0].url) is None, timeout_s=10)
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 10)
        assert load.failed() == [], load.failed()[:3]
        assert [b.name for b in pool.backends] == ["b1"]
        wait_for(lambda: at_rest(router))


def test_every_view_shows_a_change_within_a_second() -> None:
    with (
        running_simulators(1) as sims,
        running_simulators(1, model="other-model") as others,
        running_router([sims[0].url], admin_api_key=ADMIN) as router,
    ):
        url = router.url

        def views() -> dict[str, Any]:
            return {
                "models": [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]],
                "health": {
                    b["name"]: b["state"] for b in httpx.get(f"{url}/health").json()["backends"]
                },
                "metrics": {
                    b["name"]: b["state"] for b in httpx.get(f"{url}/metrics").json()["backends"]
                },
                "architecture": {
                    b["name"]: b["state"]
                    for b in httpx.get(f"{url}/architecture").json()["backends"]
                },
                "dashboard": {
                    b["name"]: b["state"]
                    for b in httpx.get(f"{url}/dashboard/data").json()["backends"]
                },
                "prom": httpx.get(f"{url}/metrics", headers={"Accept": "text/plain"}).text,
            }

        wait_for(lambda: views()["models"] == ["sim-model"])
        resp = httpx.post(f"{url}/admin/backends", json={"url": others[0].url}, headers=AUTH)
        assert resp.status_code == 201
        wait_for(lambda: views()["models"] == ["other-model", "sim-model"], timeout_s=1.0)
        seen = views()
        for view in ("health", "metrics", "architecture", "dashboard"):
            assert seen[view] == {"b0": "serving", "b1": "serving"}, view
        assert 'kvroute_backend_serving{backend="b1"} 1.0' in seen["prom"]
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "other-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.headers["x-router-backend"] == "b1"
        assert httpx.delete(f"{url}/admin/backends/b1", headers=AUTH).status_code == 202
        wait_for(lambda: views()["models"] == ["sim-model"], timeout_s=1.0)
        wait_for(lambda: views()["health"] == {"b0": "serving"}, timeout_s=1.0)
        seen = views()
        for view in ("metrics", "architecture", "dashboard"):
            assert seen[view] == {"b0": "serving"}, view
        assert 'backend="b1"' not in seen["prom"].split("kvroute_backend_in_flight", 1)[1]
        gone = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "other-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert gone.status_code == 404
