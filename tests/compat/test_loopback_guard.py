"""The guard every compat test runs under refuses to leave loopback, and says so."""

from __future__ import annotations

import socket

import httpx
import pytest


def test_outside_hosts_are_refused_and_recorded(outside_attempts: list[str]) -> None:
    before = len(outside_attempts)
    with pytest.raises(httpx.ConnectError):
        httpx.get("http://example.com/", timeout=2)
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
    assert outside_attempts[before:] == ["resolve 'example.com'", "connect ('192.0.2.1', 80)"]
    del outside_attempts[before:]  # recorded on purpose: not a failure of this test


def test_loopback_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            pass
    assert socket.getaddrinfo("localhost", 80)
