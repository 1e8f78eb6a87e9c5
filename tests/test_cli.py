"""The command line as users run it: `kvroute demo` and `main.py` start-up errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from app.devtools.ports import free_port
from app.stream_stats import read_stats
from tests.conftest import wait_for


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def test_demo_serves_a_stream_and_cleans_up_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--port", str(port), "--backends", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout_s=30)
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
        assert stats is not None and stats["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "curl -N" in out
    assert all(refuses(b) for b in backends), "a simulated backend outlived the demo"


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
    assert result.returncode == 2 and time.monotonic() - start < 30
    assert result.stderr.strip().startswith("kvroute: invalid setting PORT:")
    assert "Traceback" not in result.stderr
