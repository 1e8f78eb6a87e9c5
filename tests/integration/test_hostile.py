"""Hostile backends and hostile clients: each gets its bounded, documented answer, and nothing is
left held. Real servers on loopback; raw sockets where a client breaks HTTP on purpose."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from app.listener import LINGER_S, MAX_PIPELINED
from tests.conftest import RouterServer, running_router, running_simulators, wait_for
from tests.integration.hostile_backend import HostileBackend

CHAT: dict[str, Any] = {
    "model": "sim-model",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "hello"}],
}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def router_idle(router: RouterServer) -> bool:
    metrics = httpx.get(f"{router.url}/metrics").json()
    return bool(sum(metrics["in_flight"].values()) == 0 and metrics["admission"]["in_flight"] == 0)


# --- hostile backends --------------------------------------------------------------------------
def test_an_event_that_never_ends_is_cut_and_memory_stays_flat() -> None:
    with (
        HostileBackend("endless_event") as backend,
        running_router(
            [backend.url], served_model="sim-model", max_sse_event_bytes=1 << 20
        ) as router,
    ):
        before = rss_bytes()
        resp = httpx.post(
            f"{router.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30
        )
        grown = rss_bytes() - before
        events = events_of(resp.content)
        assert resp.status_code == 200
        assert events[-1] == b"data: [DONE]"
        error = orjson.loads(events[-3].removeprefix(b"data: "))["error"]
        assert "without ending an SSE event" in error["message"]
        stats = orjson.loads(events[-2].split(b"data: ", 1)[1])["router_stats"]
        assert "error" in stats
        assert grown < 64 << 20, f"router memory grew {grown >> 20} MB"
        wait_for(lambda: router_idle(router))
        wait_for(lambda: backend.streams_open == 0)  # upstream was closed


@pytest.mark.parametrize("client", ["httptools", "aiohttp"])
def test_headers_that_never_end_are_a_502_not_a_memory_leak(client: str) -> None:
    with (
        HostileBackend("endless_head") as backend,
        running_router([backend.url], served_model="sim-model", upstream_client=client) as router,
    ):
        before = rss_bytes()
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT, timeout=30)
        grown = rss_bytes() - before
        assert resp.status_code == 502, resp.text
        if client == "httptools":  # aiohttp has its own limit (8190 bytes a field)
            assert "response headers exceed 65536 bytes" in resp.json()["error"]["message"]
        assert grown < 16 << 20, f"router memory grew {grown >> 20} MB"
        wait_for(lambda: router_idle(router))
        wait_for(lambda: backend.streams_open == 0)  # the connection was closed


def test_crlf_framed_stream_is_relayed_with_one_done() -> None:
    with (
        HostileBackend("crlf") as backend,
        running_router([backend.url], served_model="sim-model") as router,
    ):
        resp = httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, "stream": True})
        events = events_of(resp.content)
        assert resp.status_code == 200
        assert events.count(b"data: [DONE]") == 1
        assert events[-1] == b"data: [DONE]"
        assert not any(b'"error"' in e for e in events)
        contents = [e for e in events if b'"content":"t' in e]
        assert len(contents) == 5
        stats = orjson.loads(events[-2].split(b"data: ", 1)[1])["router_stats"]
        assert (stats["completion_tokens"], stats["token_source"]) == (5, "backend")
        assert b'"usage"' not in resp.content  # the injected usage chunk is hidden


@pytest.mark.parametrize("stream", [False, True])
def test_gzip_answers_are_decoded(stream: bool) -> None:
    with (
        HostileBackend("gzip") as backend,
        running_router([backend.url], served_model="sim-model") as router,
    ):
        resp = httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status_code == 200
        assert "content-encoding" not in resp.headers
        if stream:
            events = events_of(resp.content)
            contents = [e for e in events if b'"content":"t' in e]
            assert events[-1] == b"data: [DONE]"
            assert len(contents) == 5
        else:
            assert resp.json()["choices"][0]["message"]["content"] == "zipped"


def test_upstream_silence_ends_the_stream_after_the_read_timeout() -> None:
    with (
        HostileBackend("silence") as backend,
        running_router([backend.url], served_model="sim-model", read_timeout_s=0.5) as router,
    ):
        resp = httpx.post(
            f"{router.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        )
        events = events_of(resp.content)
        assert events[-1] == b"data: [DONE]"
        assert b"mid-stream" in events[-3]
        wait_for(lambda: router_idle(router))


def test_a_503_whose_body_breaks_is_a_502_and_releases_everything() -> None:
    with (
        HostileBackend("broken_503") as backend,
        running_router([backend.url], served_model="sim-model", retries=0) as router,
    ):
        resp = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 502
        assert resp.json()["error"]["type"] == "upstream_error"
        wait_for(lambda: router_idle(router))


# --- hostile clients ---------------------------------------------------------------------------
@pytest.fixture
def plain_router() -> Iterator[tuple[RouterServer, str]]:
    fast = {"base_ttft_s": 0.001, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 2000.0}
    with (
        running_simulators(1, **fast) as sims,
        running_router(
            [sims[0].url],
            served_model="sim-model",
            header_timeout_s=1.0,
            body_timeout_s=1.0,
            max_header_bytes=16384,
            max_headers=50,
        ) as router,
    ):
        yield router, sims[0].url


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1_000_000),
        ("max_tokens", 0),
        ("max_completion_tokens", -5),
        ("n", 0),
        ("n", 129),  # OpenAI's limit is 128; vLLM's 16384, each choice a sequence it runs
        ("n", 10**9),
    ],
)
def test_counts_out_of_bounds_are_400(
    plain_router: tuple[RouterServer, str], field: str, value: int
) -> None:
    router, _ = plain_router
    resp = httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, field: value})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == field


def test_json_nested_too_deep_is_400(plain_router: tuple[RouterServer, str]) -> None:
    router, _ = plain_router
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    for body in (
        {**CHAT, "stream": True, "tools": deep},
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": deep}]}],
            "stream": True,
        },
    ):
        resp = httpx.post(
            f"{router.url}/v1/chat/completions",
            content=_deep_json(body),
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"


def _deep_json(body: Any) -> bytes:
    """JSON text of `body`, however deep (orjson itself refuses past 254 levels)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        return json.dumps(body).encode()
    finally:
        sys.setrecursionlimit(limit)


def test_request_ids_are_kept_only_when_short_printable_ascii(
    plain_router: tuple[RouterServer, str],
) -> None:
    router, sim = plain_router
    kept = httpx.post(
        f"{router.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123"}
    )
    assert kept.headers["x-request-id"] == "abc-123"
    for bad in ("x" * 6000, "caf\u00e9", "has space"):
        resp = httpx.post(
            f"{router.url}/v1/chat/completions",
            json=CHAT,
            headers=[(b"X-Request-Id", bad.encode())],
        )
        assert resp.status_code == 200
        assert len(resp.headers["x-request-id"]) == 32
        assert resp.headers["x-request-id"] != bad
    sent = [
        entry["headers"].get("x-request-id")
        for entry in httpx.get(f"{sim}/sim/stats").json()["log"]
    ]
    assert "abc-123" in sent
    assert all(len(s) <= 128 for s in sent if s)


def test_no_redirect_anywhere(plain_router: tuple[RouterServer, str]) -> None:
    router, _ = plain_router
    for method, path in (
        ("POST", "/v1/responses"),
        ("POST", "/v1/responses/"),
        ("GET", "/v1/responses/resp_1"),
        ("POST", "/v1/chat/completions/"),
        ("GET", "/health/"),
    ):
        resp = httpx.request(
            method, f"{router.url}{path}", json=CHAT, headers={"Host": "evil.example"}
        )
        assert resp.status_code in (400, 404, 405), (path, resp.status_code)
        assert "location" not in resp.headers
        assert "error" in resp.json()


def raw_exchange(port: int, payload: bytes, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def long_stream_request() -> bytes:
    """A raw POST of a stream of 30 000 tokens: 15 s of generation on `plain_router`'s backend."""
    body = json.dumps({**CHAT, "max_tokens": 30_000, "stream": True}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


LIVE = b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n"
LAST_LIVE = b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_pipelined_requests_are_answered_in_order(
    plain_router: tuple[RouterServer, str],
) -> None:
    """Requests pipelined within the bound (here with bodies that add up past MAX_HEADER_BYTES
    in one read: they are not headers) are all answered, in order."""
    router, _ = plain_router
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 8000}]}).encode()
    post = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(post * 3 + LIVE * 4 + LAST_LIVE[:20])  # ~25 KB, ending inside headers
        time.sleep(0.2)
        sock.sendall(LAST_LIVE[20:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200"] * 8, answer[:500]
    assert answer.count(b'"chat.completion"') == 3
    assert answer.endswith(b'{"status":"alive"}')


@pytest.mark.parametrize("one_read", [False, True])
def test_pipelining_past_the_bound_is_cut(
    plain_router: tuple[RouterServer, str], caplog: pytest.LogCaptureFixture, one_read: bool
) -> None:
    """Every request in a read is parsed before uvicorn pauses reading: 8000 tiny ones held
    ~1.8 MB per connection. Past MAX_PIPELINED waiting, the connection is cut. The stream
    being answered (begun in an earlier read, or the first of the same one) learns of it."""
    router, sim = plain_router
    state = router.router
    stream = long_stream_request()
    answer = b""
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        if one_read:
            sock.sendall(stream + LIVE * (MAX_PIPELINED + 8))
        else:
            sock.sendall(stream)  # a long stream (15 s of generation) being answered
            wait_for(lambda: state.admission.in_flight == 1)
            sock.sendall(LIVE * (MAX_PIPELINED + 8))
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.count(b"HTTP/1.1") <= 1  # at most the stream's head (the reset may drop it)
    assert f"pipelined more than {MAX_PIPELINED} requests" in caplog.text
    # The stream in progress learnt of it: its slot freed and its generation stopped at once.
    wait_for(lambda: router_idle(router), timeout_s=5)
    wait_for(lambda: state.metrics.errors["PipelineTooDeep"] == 1)
    stats = httpx.get(f"{sim}/sim/stats").json()
    # In one read, the cut may come before the stream was sent upstream at all.
    assert (stats["running"], stats["completed"]) == (0, 0)
    assert stats["aborted"] == 1 or (one_read and stats["aborted"] == 0), stats
    assert httpx.get(f"{router.url}/live").status_code == 200


def test_a_client_that_leaves_with_requests_pipelined_frees_the_one_answered(
    plain_router: tuple[RouterServer, str],
) -> None:
    """A stream being answered with a request queued behind it (pipelined), then the client
    leaves: uvicorn tells the departure to the last request parsed, the queued one, so the
    listener points it at the one being answered, which stops (slot freed, generation aborted)."""
    router, sim = plain_router
    state = router.router
    stream = long_stream_request()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(stream + LIVE)
        wait_for(lambda: httpx.get(f"{sim}/sim/stats").json()["running"] == 1)
    wait_for(lambda: router_idle(router), timeout_s=5)  # 15 s of generation were left
    wait_for(lambda: state.metrics.client_disconnects == 1)
    stats = httpx.get(f"{sim}/sim/stats").json()
    assert (stats["running"], stats["aborted"], stats["completed"]) == (0, 1, 0)


def test_a_refused_connection_lingers_only_so_long(plain_router: tuple[RouterServer, str]) -> None:
    """After a 431 the router half-closes and drops what the client still sends, but a client
    that keeps the connection open is closed after LINGER_S."""
    router, _ = plain_router
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
        answer = b""
        while chunk := sock.recv(65536):  # the refusal, then the router's FIN
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 431")
        sock.sendall(b"a" * 1000)  # still read (and dropped) while it lingers: no reset
        time.sleep(LINGER_S + 1.0)
        with pytest.raises(OSError):  # closed now: the kernel answers with a reset
            for _ in range(20):
                sock.sendall(b"a" * 65536)
                time.sleep(0.05)
    assert httpx.get(f"{router.url}/health").status_code == 200


def test_http10_client_gets_a_stream_it_can_read(plain_router: tuple[RouterServer, str]) -> None:
    router, _ = plain_router
    body = orjson.dumps({**CHAT, "stream": True})
    raw = raw_exchange(
        router.port,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    assert length == len(payload)
    assert payload.endswith(b"data: [DONE]\n\n")


def test_huge_or_many_headers_are_431(plain_router: tuple[RouterServer, str]) -> None:
    router, _ = plain_router
    # Far past the limit, so most of it is still unread when the router refuses: closing then
    # would reset the connection and lose the 431 (as it did, 40 times in 40 at this size).
    for size in (100_000, 300_000):
        huge = raw_exchange(
            router.port,
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n",
        )
        assert huge.startswith(b"HTTP/1.1 431")
        assert b"headers_too_large" in huge
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(80))
    resp = raw_exchange(router.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert resp.startswith(b"HTTP/1.1 431")
    assert b"too_many_headers" in resp
    assert httpx.get(f"{router.url}/health").status_code == 200


def trickle(port: int, opening: bytes, byte: bytes) -> tuple[bytes, float]:
    """Send `opening`, then `byte` every 0.1 s until the router answers (4 s at most):
    (its answer, seconds taken)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(opening)
        answer = b""
        for _ in range(40):
            try:
                sock.sendall(byte)
            except OSError:
                break
            time.sleep(0.1)
            sock.settimeout(0.01)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        return answer, time.monotonic() - start


def test_slow_headers_are_cut(plain_router: tuple[RouterServer, str]) -> None:
    router, _ = plain_router
    # One header byte every 0.1 s: never done within the 1 s deadline.
    answer, took_s = trickle(router.port, b"GET /health HTTP/1.1\r\n", b"X")
    assert took_s < 3
    assert answer.startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as idle:
        idle.settimeout(3)
        assert idle.recv(10) == b""  # an idle connection is closed too


def test_a_trickled_body_is_cut(plain_router: tuple[RouterServer, str]) -> None:
    """A byte every 0.1 s never finishes a 100-byte body within the 1 s deadline: 408, nothing
    admitted, and the next client is served."""
    router, _ = plain_router
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    answer, took_s = trickle(router.port, head, b" ")
    assert 1.0 <= took_s < 3
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"code":"body_timeout"' in answer
    wait_for(lambda: router_idle(router))
    metrics = router.router.metrics
    wait_for(lambda: metrics.errors["BodyTimeout"] == 1)  # recorded as ours, not a departure
    assert metrics.client_disconnects == 0
    assert router.router.admission.stats.admitted == 0
    again = httpx.post(f"{router.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert again.status_code == 200


def test_a_body_that_came_while_the_loop_was_busy_is_not_late(
    plain_router: tuple[RouterServer, str],
) -> None:
    """The body arrives in time, but the router's loop is busy past the 1 s deadline (a loaded
    machine stalls it for that long). The deadlines rely on the loop reading ready sockets before
    it runs due timers (uvloop's libuv polls first, as asyncio does): a client on time is not cut
    for the router's own lateness."""
    router, _ = plain_router
    payload = json.dumps(CHAT).encode()
    loop = router._loop  # the router's own event loop, in its thread
    assert loop is not None
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
        )
        time.sleep(0.3)  # headers read: the body's deadline runs
        loop.call_soon_threadsafe(time.sleep, 1.5)  # the loop busy until past the deadline
        time.sleep(0.1)
        sock.sendall(payload)  # on time, waiting in the kernel
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_websocket_upgrade_is_a_plain_http_request(
    plain_router: tuple[RouterServer, str],
) -> None:
    """The router has no WebSocket route, and runs uvicorn without WebSocket support: an
    Upgrade gets an HTTP answer, not 101 and a protocol with limits of its own."""
    router, _ = plain_router
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        answer = sock.recv(65536)
    status = answer.split(b"\r\n", 1)[0]
    assert not status.startswith(b"HTTP/1.1 101"), answer[:200]
    assert status.split()[1] in (b"404", b"405"), status


def test_connections_past_the_cap_are_refused() -> None:
    with (
        running_simulators(1) as sims,
        running_router([sims[0].url], served_model="sim-model", max_connections=3) as router,
    ):
        held = [socket.create_connection(("127.0.0.1", router.port)) for _ in range(3)]
        try:
            wait_for(lambda: raw_exchange(router.port, b"").startswith(b"HTTP/1.1 503"))
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: httpx.get(f"{router.url}/health").status_code == 200)


# --- clients that stop reading -----------------------------------------------------------------
# A simulated token streams as ~225 bytes: 30 000 of them (6.7 MB) are more than the socket
# buffers between the router and a client (the router's send buffer grows to 4 MiB at most, the
# client's is set to 16 KiB), so a client that reads nothing makes the router wait on it. The
# stalled client asks for 100 000 (5 s of generation), which cannot all be buffered upstream
# either: the simulator is still generating when the client is cut.
SEND_TIMEOUT_S = 0.5
SEND_MIN_BYTES_PER_S = 256 * 1024


@pytest.fixture
def stalling_router() -> Iterator[tuple[RouterServer, str]]:
    fast = {"base_ttft_s": 0.001, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 20_000.0}
    with (
        running_simulators(1, max_model_len=131_072, **fast) as sims,
        running_router(
            [sims[0].url],
            served_model="sim-model",
            send_timeout_s=SEND_TIMEOUT_S,
            send_min_bytes_per_s=SEND_MIN_BYTES_PER_S,
            max_in_flight=2,
            queue_timeout_s=30.0,
        ) as router,
    ):
        yield router, sims[0].url


def small_window_post(port: int, body: dict[str, Any]) -> socket.socket:
    """A POST on a socket with a 16 KiB receive buffer (set before connect, so the window stays
    small), its response headers read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(payload) + payload
    )
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_clients_that_stop_reading_are_cut_and_free_their_slots(
    stalling_router: tuple[RouterServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients stop reading and hold both slots; a third waits in the queue. They are cut
    SEND_TIMEOUT_S after the router last got a byte to them, their generations stop, and the
    queued request is served."""
    router, sim = stalling_router
    state = router.router
    long_stream = {**CHAT, "max_tokens": 100_000, "stream": True}
    started = time.monotonic()
    stalled = [small_window_post(router.port, long_stream) for _ in range(2)]
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(httpx.post, f"{router.url}/v1/chat/completions", json=CHAT, timeout=30)
        wait_for(lambda: state.admission.waiting == 1)
        answer = queued.result()
    took_s = time.monotonic() - started
    assert answer.status_code == 200
    # Counted as the router's timeouts, not as clients that left.
    wait_for(lambda: state.metrics.errors["SendStalled"] == 2)
    assert state.metrics.client_disconnects == 0
    for sock in stalled:
        with sock:
            try:
                while sock.recv(1 << 20):  # what the kernel still holds, then the end
                    pass
            except ConnectionResetError:
                pass  # aborted: the reset can arrive before what was sent is read
    assert took_s >= SEND_TIMEOUT_S
    assert caplog.text.count(f"took none of its answer for {SEND_TIMEOUT_S:g} s") == 2
    wait_for(lambda: router_idle(router))
    stats = wait_for(lambda: (s := httpx.get(f"{sim}/sim/stats").json())["running"] == 0 and s)
    assert (stats["aborted"], stats["completed"]) == (2, 1)  # their generations were stopped


def test_a_slow_reader_is_not_a_stalled_one(stalling_router: tuple[RouterServer, str]) -> None:
    """Reading a little at a time, with pauses shorter than the timeout, gets the whole answer
    however long that takes (here several times SEND_TIMEOUT_S)."""
    router, _ = stalling_router
    started = time.monotonic()
    received = b""
    with small_window_post(router.port, {**CHAT, "max_tokens": 30_000, "stream": True}) as sock:
        while not received.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(256 * 1024)
            assert chunk, "the router closed the stream"
            received += chunk
            time.sleep(SEND_TIMEOUT_S / 50)
    assert time.monotonic() - started > 2 * SEND_TIMEOUT_S
    assert b"data: [DONE]" in received[-64:]
    assert router.router.metrics.client_disconnects == 0


def test_a_trickling_reader_is_cut_below_the_least_rate(
    stalling_router: tuple[RouterServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """8 KiB every 0.1 s is progress within every SEND_TIMEOUT_S, but 80 KiB/s is under the
    least rate (256 KiB/s here) while the router waits on it: cut about one timeout after the
    router began waiting, as the router's doing (408 SendTooSlow), and its slot freed. Without
    the rate it reads on (~80 s for this answer)."""
    router, sim = stalling_router
    state = router.router
    received = 0
    with small_window_post(router.port, {**CHAT, "max_tokens": 30_000, "stream": True}) as sock:
        started = time.monotonic()
        try:
            while chunk := sock.recv(8 * 1024):
                received += len(chunk)
                assert time.monotonic() - started < 5, "still reading: not cut"
                time.sleep(0.1)
        except ConnectionResetError:
            pass  # aborted
    assert received < 2 << 20  # cut long before its 6.7 MB
    wait_for(lambda: state.metrics.errors["SendTooSlow"] == 1)
    assert state.metrics.errors["SendStalled"] == state.metrics.client_disconnects == 0
    assert f"under SEND_MIN_BYTES_PER_S={SEND_MIN_BYTES_PER_S}: connection cut" in caplog.text
    wait_for(lambda: router_idle(router))
    wait_for(lambda: httpx.get(f"{sim}/sim/stats").json()["running"] == 0)


def test_bodies_held_at_once_are_bounded() -> None:
    """Four 60 KB bodies held by requests in flight (a slow backend) fill a 256 KiB budget: the
    next two are refused with 429 bodies_full, the four are answered, and the budget is all
    given back."""
    slow = {"base_ttft_s": 2.0, "prefill_s_per_token": 0.0, "decode_tokens_per_s": 1000.0}
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 60_000}]}
    with (
        running_simulators(1, **slow) as sims,
        running_router(
            [sims[0].url],
            served_model="sim-model",
            max_body_bytes=64 * 1024,
            max_body_bytes_held=256 * 1024,
        ) as router,
        ThreadPoolExecutor(4) as pool,
    ):
        url = f"{router.url}/v1/chat/completions"
        bodies = router.router.bodies
        held = [pool.submit(httpx.post, url, json=body, timeout=30) for _ in range(4)]
        wait_for(lambda: router.router.admission.in_flight == 4)  # their bodies read whole
        size = bodies.held
        prom = httpx.get(f"{router.url}/metrics", headers={"Accept": "text/plain"}).text
        assert f"\nkvroute_body_bytes_held {float(size)}\n" in prom
        refused = [httpx.post(url, json=body, timeout=30) for _ in range(2)]
        assert bodies.held == size  # the four still hold theirs
        assert [r.status_code for r in refused] == [429, 429]
        assert {r.json()["error"]["code"] for r in refused} == {"bodies_full"}
        assert [f.result().status_code for f in held] == [200] * 4
        metrics = httpx.get(f"{router.url}/metrics").json()
        assert metrics["bodies"] == {"held_bytes": 0, "max_bytes": 256 * 1024, "refused": 2}
        assert metrics["admission"]["rejected"]["bodies_full"] == 2
        prom = httpx.get(f"{router.url}/metrics", headers={"Accept": "text/plain"}).text
        assert "\nkvroute_body_bytes_held 0.0\n" in prom
        assert 'kvroute_admission_rejections_total{reason="bodies_full"} 2.0' in prom
        assert httpx.post(url, json=body, timeout=30).status_code == 200
