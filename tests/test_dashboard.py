"""The dashboard: the per-second series, the data it serves, the page itself, and the page in a
real headless Chromium against a router under load (charts drawn, values moving)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from app.backends import BackendPool, VllmMetrics
from app.dashboard import TenantTags, dashboard_data, page_headers, page_html
from app.dashboard.series import SeriesRecorder, Totals, sample_between
from app.metrics import RequestRecord, RequestScope, RouterMetrics
from tests.conftest import RouterServer, missing_service, wait_for
from tools.dashboard_shot import dashboard_page, find_chromium, polls, wait_polls

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHAT = {"model": "sim-model", "max_tokens": 8, "stream": True}


def record(m: RouterMetrics, tenant: str, outcome: str, ttft_ms: float, prompt: int = 100) -> None:
    m.record(
        RequestRecord(
            endpoint="chat",
            status=200,
            backend="b0",
            outcome=outcome,
            affinity="conversation" if outcome == "hit" else "none",
            ttft_ms=ttft_ms,
            prompt_tokens=prompt,
            cached_tokens=prompt // 2 if outcome == "hit" else 0,
            scope=RequestScope("id", 0.0, tenant=tenant, model="m"),
        )
    )


# --- pure --------------------------------------------------------------------------------
def test_sample_between_is_the_interval() -> None:
    prev = Totals(requests=10, prompt_tokens=1000, cached_tokens=400, ttft_seen=8)
    cur = Totals(requests=30, prompt_tokens=3000, cached_tokens=1900, ttft_seen=12)
    s = sample_between(
        prev, cur, 2.0, [30.0, 10.0, 20.0, 40.0], time_s=5.0, in_flight=3, kv_usage=(("b0", 0.5),)
    )
    assert (s.rps, s.cached_ratio, s.ttft_p50_ms, s.ttft_p99_ms) == (10.0, 0.75, 20.0, 40.0)
    idle = sample_between(cur, cur, 1.0, [], time_s=6.0, in_flight=0, kv_usage=())
    assert (idle.rps, idle.cached_ratio, idle.ttft_p50_ms) == (0.0, None, None)


def test_recorder_diffs_counters_per_tick() -> None:
    m = RouterMetrics()
    pool = BackendPool(["http://a:1", "http://b:1"])
    pool.backends[0].metrics = VllmMetrics(kv_usage=0.25)
    now = [100.0]
    rec = SeriesRecorder(m, pool, capacity=3, clock=lambda: now[0], wall=lambda: 1e9 + now[0])
    assert rec.tick() is None  # the baseline
    for ttft in (10.0, 20.0, 30.0):
        record(m, "acme", "hit", ttft)
    now[0] += 1.0
    first = rec.tick()
    assert first is not None
    assert first.rps == 3.0
    assert first.ttft_p50_ms == 20.0
    assert first.cached_ratio == 0.5
    assert first.kv_usage == (("b0", 0.25), ("b1", None))
    now[0] += 1.0
    second = rec.tick()
    assert second is not None
    assert (second.rps, second.ttft_p50_ms) == (0.0, None)
    for _ in range(5):
        now[0] += 1.0
        rec.tick()
    assert len(rec.samples) == 3  # a ring


def test_dashboard_data_shows_hashes_never_tenants() -> None:
    m = RouterMetrics()
    for i in range(30):
        record(m, f"tenant-{i % 3}@example.com", "hit" if i % 2 else "miss", 10.0 + i)
    m.record(RequestRecord(endpoint="chat", status=400, error_kind="BadRequest"))
    pool = BackendPool(["http://a:1"])
    rec = SeriesRecorder(m, pool)
    status = [
        {"name": "b0", "url": "http://u:pw@a:1", "healthy": True, "in_flight": 2, "owned_keys": 7}
    ]
    tags = TenantTags(key=b"k" * 16)
    data = dashboard_data(
        now_s=1.0, samples=rec.samples, backends=status, metrics=m, tags=tags, policy="sticky"
    )
    assert data["totals"]["requests"] == 31
    assert data["totals"]["errors"] == 1
    assert data["outcomes"] == {"hit": 15, "miss": 15, "spill": 0, "reassigned": 0}
    (row,) = data["backends"]
    assert row["owned_keys"] == 7
    assert row["in_flight"] == 2
    assert row["requests"] == 30
    assert row["url"] == "http://***@a:1"  # credentials in a backend URL stay hidden
    assert data["current"]["in_flight"] == 2
    assert data["current"]["rps"] == 0.0
    recent = data["recent"]
    assert len(recent) == 12
    assert recent[0]["ttft_ms"] == 39.0  # newest first
    assert {d["tenant"] for d in data["recent"]} == {
        tags(f"tenant-{i}@example.com") for i in range(3)
    }
    assert all(re.fullmatch(r"[0-9a-f]{8}", d["tenant"]) for d in recent)
    assert "example.com" not in repr(data)
    assert TenantTags(key=b"x" * 16)("tenant-0@example.com") != tags("tenant-0@example.com")


def test_page_is_self_contained_with_a_strict_policy() -> None:
    html = page_html().decode()
    # No CDN, no external script, style, font or image: every URL is the router's own.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html
    assert "url(" not in html
    (script,) = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = page_headers()["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp
    assert "prefers-color-scheme: dark" in html
    assert "innerHTML" not in script  # data reaches the page as text only


# --- over HTTP -----------------------------------------------------------------------------
def test_dashboard_routes(router: RouterServer) -> None:
    page = httpx.get(f"{router.url}/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == page_headers()["content-security-policy"]
    for i in range(3):
        body = {**CHAT, "messages": [{"role": "user", "content": f"c{i}"}]}
        httpx.post(f"{router.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "t-1"})
    wait_for(lambda: len(router.router.series.samples) >= 1, timeout_s=5)
    data = httpx.get(f"{router.url}/dashboard/data").json()
    assert data["totals"]["requests"] == 3
    assert data["policy"] == "sticky"
    assert [b["name"] for b in data["backends"]] == ["b0", "b1", "b2"]
    assert all(b["healthy"] for b in data["backends"])
    assert sum(b["owned_keys"] for b in data["backends"]) == 3
    assert len(data["recent"]) == 3
    assert "t-1" not in repr(data["recent"])
    assert set(data["series"]) == {"t", "rps", "cached_ratio", "ttft_p50_ms", "ttft_p99_ms"} | {
        "in_flight",
        "kv_usage",
    }
    assert set(data["series"]["kv_usage"]) == {"b0", "b1", "b2"}


# --- in a real browser ---------------------------------------------------------------------
@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        missing_service("chromium is not installed (apt-get install chromium)")
    assert path is not None
    return path


@contextmanager
def load(url: str) -> Iterator[None]:
    """Streams from a few tenants in a background thread while the block runs."""
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                body = {**CHAT, "messages": [{"role": "user", "content": f"conv {i % 12}"}]}
                headers = {"X-Tenant-ID": f"tenant-{i % 3}"}
                client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                i += 1
                time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def texts(page: Any, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


@dataclass(frozen=True, slots=True)
class RpsChart:
    """What the requests chart shows: the total, its points, the drawn line."""

    requests: str
    points: int
    path: str | None


def rps_chart(page: Page) -> RpsChart:
    return RpsChart(
        requests=page.inner_text("#total-requests"),
        points=int(page.locator("#chart-rps").get_attribute("data-points") or 0),
        path=page.locator("#chart-rps path.line").get_attribute("d"),
    )


def test_dashboard_in_chromium(router: RouterServer, chromium: str, tmp_path: Path) -> None:
    with load(router.url):
        wait_for(lambda: len(router.router.series.samples) >= 2, timeout_s=10)
        with dashboard_page(router.url, chromium=chromium) as page:
            first = wait_polls(page, 1)
            wait_for(
                lambda: page.locator("#chart-rps").get_attribute("data-points") not in (None, "0")
            )
            before = rps_chart(page)
            wait_polls(page, polls(page) + 2)
            after = rps_chart(page)
            # The page updates itself: new data between two polls, longer series.
            assert first >= 1
            assert after.requests != before.requests
            assert after.points > before.points
            assert after.path != before.path
            assert float(page.inner_text("#kpi-rps")) > 0
            # Every chart drew its series.
            for chart in ("#chart-rps", "#chart-ttft", "#chart-cached", "#chart-kv"):
                assert page.locator(f"{chart} path.line").count() >= 1, chart
            assert page.locator("#chart-ttft path.line").count() == 2  # p50 and p99
            assert page.locator("#chart-kv path.line").count() == 3  # one per backend
            assert texts(page, "#backends tbody tr td:first-child") == ["b0", "b1", "b2"]
            assert texts(page, "#backends tbody tr td:nth-child(2)") == ["up", "up", "up"]
            tenants = set(texts(page, "#recent tbody td:nth-child(2)"))
            assert tenants
            assert all(re.fullmatch(r"[0-9a-f]{8}", t) for t in tenants)
            mix = texts(page, "#mix-legend li")
            assert [m.split()[1] for m in mix] == ["hit", "miss", "spill", "reassigned"]
            assert page.locator("#status.live").count() == 1
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("KVROUTE_DASHBOARD_SCREENSHOT"):
                page.screenshot(path=os.environ["KVROUTE_DASHBOARD_SCREENSHOT"], full_page=True)
            # Dark mode follows the system's preference.
            light = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
            page.emulate_media(color_scheme="dark")
            dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
            assert sum(int(c) for c in re.findall(r"\d+", light)[:3]) > 3 * 192, light
            assert sum(int(c) for c in re.findall(r"\d+", dark)[:3]) < 3 * 64, dark
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
