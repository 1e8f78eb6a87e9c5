"""Health over an SSH direct-tcpip channel: a plain HTTP/1.0 GET built and parsed by hand."""

from __future__ import annotations

import json


def probe_address(bind: str) -> str:
    """Where to reach the server from the host itself."""
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::", "*") else bind


def http_get_request(path: str, host: str, port: int, api_key: str | None = None) -> bytes:
    headers = [f"GET {path} HTTP/1.0", f"Host: {host}:{port}", "Accept: */*", "Connection: close"]
    if api_key:
        headers.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode()


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.x response; status 0 when it does not parse."""
    head, _sep, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if (
        len(status_line) < 2
        or not status_line[0].startswith(b"HTTP/")
        or not status_line[1].isdigit()
    ):
        return 0, b""
    return int(status_line[1]), body


def served_model_ids(body: bytes) -> list[str]:
    """Model ids from a ``/v1/models`` body."""
    try:
        value = json.loads(body)
    except ValueError:
        return []
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list):
        return []
    return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
