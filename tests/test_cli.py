"""The command line as users run it: `kvroute demo` and `main.py` start-up errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from app.stream_stats import read_stats
from harness.ports import free_port
from tests.conftest import wait_for


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_through_uv_run_stops_cleanly_on_a_signal_to_its_group(signum: int) -> None:
    """As a terminal's Ctrl-C does it: the signal goes to the whole process group (uv and the
    router both get it). Every child must be gone, its ports closed, and no traceback."""
    if shutil.which("uv") is None:
        pytest.fail("uv is not on PATH: the README's commands need it")
    port = free_port()
    proc = subprocess.Popen(
        ["uv", "run", "--no-sync", "kvroute", "demo", "--port", str(port), "--backends", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout_s=60)
        backends = [b["url"] for b in httpx.get(f"{url}/health").json()["backends"]]
        body = {
            "model": "demo-model",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello!"}],
        }
        raw = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).content
        events = [e for e in raw.split(b"\n\n") if e.strip()]
        assert events[-1] == b"data: [DONE]"
        assert events[-2].startswith(b"data: ")  # the default form: a plain chunk
        stats = read_stats(events[-2])
        assert stats is not None
        assert stats["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "curl -N" in out, out
    assert "Traceback" not in out, out
    assert len(backends) == 3
    assert all(refuses(b) for b in backends), "a backend outlived the demo"
    assert refuses(url)


def test_serve_without_backends_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BACKEND_URLS",)}
    result = subprocess.run(
        [sys.executable, "main.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "BACKEND_URLS is not set" in result.stderr


def test_malformed_setting_is_one_line() -> None:
    env = {**os.environ, "BACKEND_URLS": "http://127.0.0.1:1", "PORT": "eighty"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "main.py"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert time.monotonic() - start < 30
    assert result.stderr.strip().startswith("kvroute: invalid setting PORT:")
    assert "Traceback" not in result.stderr


def test_a_ctrl_c_delivered_twice_at_once_keeps_the_graceful_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through `uv run`, one Ctrl-C reaches the router twice (from the terminal's process group
    and from uv): uvicorn alone took the second for "force exit" and skipped the app's shutdown,
    which is how the demo test above failed once on CI with a lifespan traceback. A second
    SIGINT after DUPLICATE_SIGINT_S is a second Ctrl-C and still forces the exit."""
    import uvicorn

    from app import cli

    server = cli.server_class()(uvicorn.Config(app=lambda: None))
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGINT, None)  # the same Ctrl-C, passed on by uv
    assert server.should_exit
    assert not server.force_exit
    monkeypatch.setattr(cli, "DUPLICATE_SIGINT_S", 0.0)
    server.handle_exit(signal.SIGINT, None)  # a deliberate second Ctrl-C
    assert server.force_exit
