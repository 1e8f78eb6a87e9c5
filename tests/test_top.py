"""`kvroute top`: one frame rendered from /dashboard/data, and the command run against a live router."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from typing import Any

import httpx
from rich.console import Console

from app.cli import build_parser
from app.top import render, sparkline
from tests.conftest import RouterServer, wait_for


def frame_text(data: dict[str, Any]) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(render(data, "http://router:8080"))
    return console.export_text()


def data(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "now": 0,
        "policy": "sticky",
        "current": {"rps": 12.5, "in_flight": 3, "ttft_p50_ms": 8.25, "ttft_p99_ms": 1500.0},
        "totals": {"requests": 1234, "errors": 2, "retries": 1, "cached_ratio": 0.625},
        "outcomes": {"hit": 30, "miss": 10, "spill": 0, "reassigned": 0},
        "backends": [
            {
                "name": "b0",
                "healthy": True,
                "in_flight": 3,
                "running": 2.0,
                "waiting": 0.0,
                "kv_usage": 0.4,
                "owned_keys": 17,
                "requests": 40,
                "cached_ratio": 0.5,
                "outcomes": {"hit": 30, "miss": 10, "spill": 0, "reassigned": 0},
            },
            {"name": "b1", "healthy": False, "outcomes": {}},
        ],
        "series": {"rps": [1.0, 2.0, None, 4.0]},
        "recent": [
            {
                "time": 0,
                "tenant": "abcd1234",
                "model": "m",
                "backend": "b0",
                "outcome": "hit",
                "affinity": "conversation",
                "ttft_ms": 8.25,
                "status": 200,
            }
        ],
    }
    base.update(overrides)
    return base


def test_render_shows_the_figures() -> None:
    text = frame_text(data())
    for shown in ("req/s 12.5", "in flight 3", "8.2 ms", "1.50 s", "62.5%", "requests 1,234"):
        assert shown in text, shown
    b0 = next(line for line in text.splitlines() if "│ b0 " in line)
    assert "up" in b0
    assert "40.0%" in b0
    assert "17" in b0
    assert "50.0%" in b0
    b1 = next(line for line in text.splitlines() if "│ b1 " in line)
    assert "down" in b1
    assert "hit 30 (75%)" in text
    assert "abcd1234" in text
    assert "conversation" in text


def test_render_of_an_idle_router() -> None:
    empty = data(
        current={"rps": 0.0, "in_flight": 0, "ttft_p50_ms": None, "ttft_p99_ms": None},
        totals={"requests": 0, "errors": 0, "retries": 0, "cached_ratio": None},
        outcomes={},
        recent=[],
        series={"rps": []},
    )
    text = frame_text(empty)
    assert "TTFT p50 -" in text
    assert "cached tokens -" in text


def test_sparkline() -> None:
    assert sparkline([0.0, 4.0, None, 8.0]) == "▁▄ █"
    assert sparkline([]) == ""
    assert sparkline([None, 0.0]) == " ▁"
    assert len(sparkline([1.0] * 100, width=30)) == 30


def test_cli_knows_top() -> None:
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert "top" in commands.choices


def run_top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "top", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_top_once_against_a_live_router(router: RouterServer) -> None:
    for i in range(4):
        body = {
            "model": "sim-model",
            "max_tokens": 4,
            "stream": True,
            "messages": [{"role": "user", "content": "same" if i < 3 else "other"}],
        }
        httpx.post(f"{router.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "acme"})
    wait_for(lambda: len(router.router.series.samples) >= 1, timeout_s=5)
    out = run_top("--url", router.url, "--once", "--width", "160")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"kvroute top · {router.url}" in text
    assert "policy sticky" in text
    assert "requests 4" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│ b" in line}
    assert set(rows) >= {"b0", "b1", "b2"}
    assert all(" up " in rows[b] for b in ("b0", "b1", "b2"))
    owned = sum(int(rows[b].split("│")[7]) for b in ("b0", "b1", "b2"))
    assert owned == 2  # two conversations
    assert "hit 2 (50%)" in text
    assert "miss 2 (50%)" in text
    assert text.count("sim-model") == 4
    assert "acme" not in text  # tenants as hashes


def test_top_reports_an_unreachable_router() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = run_top("--url", dead, "--once", "--timeout", "2")
    assert out.returncode == 1
    assert "kvroute top: cannot read" in out.stderr


def test_render_shows_probing_and_draining_backends() -> None:
    backends = [
        {"name": "b2", "healthy": False, "state": "probing", "outcomes": {}},
        {"name": "b3", "healthy": True, "state": "draining", "in_flight": 4, "outcomes": {}},
    ]
    text = frame_text(data(backends=backends))
    assert "probing" in next(line for line in text.splitlines() if "│ b2 " in line)
    assert "draining" in next(line for line in text.splitlines() if "│ b3 " in line)
