"""A backend that misbehaves on purpose, over real HTTP on loopback.

It answers `/health`, `/v1/models` and `/metrics` like vLLM, and every POST in one of these ways:
    broken_503     503 announcing 1000 bytes of body, sends 20, closes
    endless_event  200 SSE: `data: {"x": "` then filler forever, never a blank line
    endless_head   200, then one header whose value never ends
    crlf           a valid chat stream framed with CRLF line ends (as SSE allows)
    gzip           the answer gzip-encoded with `Content-Encoding: gzip` (stream or not)
    silence        200 SSE: one content chunk, then nothing, connection left open
A raw asyncio server (no framework), so it can break HTTP the ways a framework would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
from typing import Literal

import orjson

Mode = Literal["broken_503", "endless_event", "endless_head", "crlf", "gzip", "silence"]


def chat_chunks(n: int, model: str) -> list[bytes]:
    """The JSON of a vLLM-shaped chat stream of `n` content chunks, then usage."""
    base = {"id": "chatcmpl-h1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [
        {**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
        for i in range(n)
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    chunks.append(
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
        }
    )
    return [orjson.dumps(c) for c in chunks]


class HostileBackend:
    def __init__(self, mode: Mode, *, model: str = "sim-model") -> None:
        self.mode = mode
        self.model = model
        self.posts = 0
        self.open_connections = 0
        self.streams_open = 0  # endless streams still being written
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HostileBackend:
        self._thread.start()
        deadline = time.monotonic() + 5
        while self._stop is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._connection, sock=self._sock)
        self._stop = asyncio.Event()
        async with server:
            await self._stop.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    writer.write(self._get(path))
                    await writer.drain()
                    continue
                self.posts += 1
                if not await self._post(orjson.loads(body or b"{}"), writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    def _get(self, path: str) -> bytes:
        if path == "/v1/models":
            body = orjson.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        elif path == "/metrics":
            body = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        else:
            body = b""
        return _response(200, body, {"content-type": "application/json"})

    async def _post(self, request: dict[str, object], writer: asyncio.StreamWriter) -> bool:
        """Answer one POST; False when the connection is to end."""
        stream = request.get("stream") is True
        if self.mode == "broken_503":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: 1000\r\n\r\n" + b'{"error": {"message"'
            )
            await writer.drain()
            return False
        if self.mode in ("endless_event", "endless_head"):
            self.streams_open += 1
            try:
                start = b"HTTP/1.1 200 OK\r\nx-filler: "
                writer.write(
                    start if self.mode == "endless_head" else _sse_head() + b'data: {"x": "'
                )
                while True:  # until the router closes the connection
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    await asyncio.sleep(0.001)
            finally:
                self.streams_open -= 1
        if self.mode == "silence":
            writer.write(_sse_head() + b"data: " + chat_chunks(1, self.model)[1] + b"\n\n")
            await writer.drain()
            await asyncio.sleep(3600)
        chunks = chat_chunks(5, self.model)
        if self.mode == "crlf":
            events = b"".join(b"data: " + c + b"\r\n\r\n" for c in chunks) + b"data: [DONE]\r\n\r\n"
            writer.write(_sse_head() + events)
            await writer.drain()
            return False
        # gzip
        if stream:
            events = b"".join(b"data: " + c + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            writer.write(_sse_head({"content-encoding": "gzip"}) + gzip.compress(events))
            await writer.drain()
            return False
        whole = {
            "id": "chatcmpl-h2",
            "object": "chat.completion",
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "zipped"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        }
        body = gzip.compress(orjson.dumps(whole))
        writer.write(
            _response(200, body, {"content-type": "application/json", "content-encoding": "gzip"})
        )
        await writer.drain()
        return True


def _sse_head(extra: dict[str, str] | None = None) -> bytes:
    headers = {"content-type": "text/event-stream", "connection": "close", **(extra or {})}
    return (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        + b"\r\n"
    )


def _response(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
    lines += [f"{k}: {v}" for k, v in {**headers, "content-length": str(len(body))}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
