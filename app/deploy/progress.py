"""Progress of deploy steps across hosts, drawn with rich on stderr.

Each host gets one live row (step, live detail such as the vLLM log tail, bytes during the
download); finished steps are printed as permanent lines, so a non-terminal (CI log) still shows
every step with its time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Column
from rich.text import Text


class Reporter(Protocol):
    def begin(self, host: str, step: str, detail: str = "") -> None: ...

    def update(self, host: str, detail: str) -> None: ...

    def transfer(self, host: str, done: int, total: int | None) -> None: ...

    def end(self, host: str, step: str, detail: str = "", *, skipped: bool = False) -> None: ...

    def fail(self, host: str, step: str, detail: str) -> None: ...


class _TransferColumn(ProgressColumn):
    """Bytes and speed, only while a task is transferring."""

    def __init__(self) -> None:
        super().__init__()
        self._download = DownloadColumn()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        if not task.fields.get("transfer"):
            return Text("")
        return Text.assemble(self._download.render(task), " ", self._speed.render(task))


class RichReporter:
    """One progress row per host on ``console``; a context manager around the live display."""

    def __init__(self, console: Console, hosts: Sequence[str]) -> None:
        self._console = console
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn(
                "[bold]{task.fields[host]}[/]",
                table_column=Column(no_wrap=True, min_width=max(map(len, hosts), default=4)),
            ),
            TextColumn(
                "{task.description}",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            BarColumn(bar_width=24),
            _TransferColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._steps: dict[str, str] = {}
        for host in hosts:
            self._tasks[host] = self._progress.add_task("waiting", host=host, total=None)

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def begin(self, host: str, step: str, detail: str = "") -> None:
        self._started[(host, step)] = time.monotonic()
        self._steps[host] = step
        text = f"{step}: {escape(detail)}" if detail else step
        self._progress.update(
            self._tasks[host], description=text, total=None, completed=0, transfer=False
        )

    def update(self, host: str, detail: str) -> None:
        step = self._steps.get(host, "")
        line = detail.strip().replace("\r", " ")[:300]
        text = f"{step}: {escape(line)}" if step else escape(line)
        self._progress.update(self._tasks[host], description=text)

    def transfer(self, host: str, done: int, total: int | None) -> None:
        self._progress.update(self._tasks[host], completed=done, total=total, transfer=True)

    def end(self, host: str, step: str, detail: str = "", *, skipped: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._started.pop((host, step), now)
        mark = "[dim]-[/]" if skipped else "[green]✓[/]"
        suffix = " [dim](skipped)[/]" if skipped else ""
        self._console.print(
            f"{mark} {escape(host)} {step}: {escape(detail)}{suffix} [dim]{elapsed:.1f}s[/]"
        )
        self._progress.update(self._tasks[host], description="", total=None, transfer=False)

    def fail(self, host: str, step: str, detail: str) -> None:
        now = time.monotonic()
        elapsed = now - self._started.pop((host, step), now)
        self._console.print(
            f"[red]✗[/] {escape(host)} {step}: {escape(detail)} [dim]{elapsed:.1f}s[/]"
        )
