"""A TCP proxy on loopback that can leave its connections open but silent: what a network
partition, a NAT that dropped its state or a peer host that froze looks like to a client (no
error, no reset, no answer), while connections made after `thaw` work again."""

from __future__ import annotations

import asyncio
import contextlib


class FreezingProxy:
    """``async with FreezingProxy(port) as proxy``: ``proxy.port`` forwards to ``port`` until
    ``freeze()``; the connections open then stay silent for good, new ones forward again after
    ``thaw()``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._generation = 0  # connections of an older generation are frozen
        self._frozen = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def freeze(self) -> None:
        self._frozen = True
        self._generation += 1

    def thaw(self) -> None:
        self._frozen = False

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if generation != self._generation:
                    continue  # frozen: swallowed, never answered, never closed
                writer.write(data)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self._frozen:
            return  # accepted and left silent (the handler's streams stay open)
        generation = self._generation
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.add(up_writer)
        for a, b in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(a, b, generation))
            self._tasks.add(task)

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
