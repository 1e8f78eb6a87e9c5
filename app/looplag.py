"""How late this process's event loop runs, and a deadline that forgives it.

A peer (Redis, a backend accepting a connection) that answered in time but whose answer waited
behind a saturated loop has not failed: `lag_deadline` counts only the time the loop was
responsive. A router at full load must not call healthy peers dead because of its own backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class LoopLag:
    """How late this event loop has run its timers, in total: the time a saturated loop kept
    every awaiting call (a Redis reply, a backend's accept) waiting, which is not the peer's to
    answer for.

    `run()` ticks every `tick_s` while some deadline is open (an idle router pays nothing); the
    lateness of the tick now due counts too, so the figure is current even while the ticker itself
    is waiting its turn."""

    def __init__(self, tick_s: float = 0.002) -> None:
        self.tick_s = tick_s
        self.total_s = 0.0
        self.open = 0  # deadlines now running
        self._due: float | None = None
        self._wanted: asyncio.Event | None = None

    def lag_s(self, now: float) -> float:
        pending = max(0.0, now - self._due) if self._due is not None else 0.0
        return self.total_s + pending

    def opened(self) -> None:
        self.open += 1
        if self._wanted is not None and self._due is None:
            # Until the idle ticker gets its turn, the loop's delay counts as lag from now: a
            # burst that wakes it may hold the loop for a while first.
            self._due = asyncio.get_running_loop().time()
            self._wanted.set()

    def closed(self) -> None:
        self.open -= 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wanted = asyncio.Event()
        try:
            while True:
                if not self.open:
                    self._due = None
                    self._wanted.clear()
                    await self._wanted.wait()
                    if self._due is not None:  # set by `opened`
                        self.total_s += max(0.0, loop.time() - self._due)
                self._due = loop.time() + self.tick_s
                await asyncio.sleep(self.tick_s)
                self.total_s += max(0.0, loop.time() - self._due)
        finally:
            self._due = None
            self._wanted = None


@contextlib.asynccontextmanager
async def lag_deadline(budget_s: float, lag: LoopLag, cap_s: float) -> AsyncIterator[None]:
    """Raise TimeoutError in the body once the peer has had `budget_s` of a responsive loop
    without answering (the wall time minus the loop's lag meanwhile), or after `cap_s` of wall
    time whatever the loop did (a slow peer behind a saturated loop)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    lag.opened()
    lag_at_start = lag.lag_s(start)
    handle: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout_at(start + cap_s) as timeout:

            def check() -> None:
                nonlocal handle
                if timeout.expired():
                    return  # the cap came first
                now = loop.time()
                spent = (now - start) - (lag.lag_s(now) - lag_at_start)
                if spent >= budget_s:
                    timeout.reschedule(now)  # expires at once: asyncio cancels and raises
                else:
                    handle = loop.call_at(now + budget_s - spent, check)

            handle = loop.call_at(start + budget_s, check)
            try:
                yield
            finally:
                handle.cancel()
    finally:
        lag.closed()
