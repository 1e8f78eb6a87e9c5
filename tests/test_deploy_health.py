"""app/deploy/health.py: the hand-built HTTP/1.0 probe."""

from __future__ import annotations

from app.deploy.health import http_get_request, parse_http_response, probe_address, served_model_ids


def test_http_helpers() -> None:
    request = http_get_request("/v1/models", "127.0.0.1", 8000, "key")
    assert request.startswith(b"GET /v1/models HTTP/1.0\r\n")
    assert b"Authorization: Bearer key\r\n" in request
    assert request.endswith(b"\r\n\r\n")
    assert parse_http_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n{}") == (200, b"{}")
    assert parse_http_response(b"garbage") == (0, b"")
    assert served_model_ids(b'{"data":[{"id":"tiny"},{"id":"x"}]}') == ["tiny", "x"]
    assert served_model_ids(b"nope") == []
    assert probe_address("0.0.0.0") == "127.0.0.1"
    assert probe_address("10.1.2.3") == "10.1.2.3"
