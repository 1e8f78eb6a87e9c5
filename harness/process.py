"""A server as a child process in its own process group: start it, wait until it answers (with
the tail of its log when it does not), stop the whole group.

The router (``python main.py``), simulators, peer routers, redis-server and real vLLM all run
through ``ChildServer``; the readiness check is the caller's (``is_http_ok`` for most).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

HOST = "127.0.0.1"
LOG_DIR = Path(tempfile.gettempdir()) / "kvroute-harness"
_SERIAL = itertools.count()


class ServerStartError(RuntimeError):
    """The server exited before it was ready, or was not ready in time; carries its log tail."""


class ChildServer:
    """``argv`` as a child leading its own process group, stdout and stderr to a log file.

    ``with ChildServer(...) as server:`` starts it, waits until ``is_ready`` and stops it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        log_dir: Path | None = None,
        log_path: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        label = f"{name.replace(' ', '_')}-{port or os.getpid()}-{next(_SERIAL)}"
        self.log_path = log_path or (log_dir or LOG_DIR) / f"{label}.log"
        # Linux only: SIGTERM when the thread that started it dies, so a killed test run does not
        # leave servers behind (real vLLM holds GBs).
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def launch(self) -> Self:
        """Start the process and return at once (``start`` also waits until it is ready)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")  # every start of one server, kept in order
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if self.die_with_parent else None,
        )
        return self

    def is_ready(self) -> bool:
        """Whether the server answers; subclasses check their own way (this one: at once)."""
        return True

    def start(self, timeout_s: float = 30.0) -> Self:
        """Launch, then wait until ``is_ready``; stopped again if it never is."""
        self.launch()
        try:
            return self.wait_ready(self.is_ready, timeout_s)
        except BaseException:
            self.stop()
            raise

    def exit_code(self) -> int | None:
        """None while it runs; a negative code is the signal that ended it."""
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> None:
        """Raise ``ServerStartError``, with the log tail, if the process has exited."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        code = self.proc.poll()
        if code is not None:
            raise self.failure(f"exited with code {code}")

    def failure(self, what: str) -> ServerStartError:
        return ServerStartError(
            f"{self.name} ({self.url}) {what}; log {self.log_path}:\n{self.log_tail()}"
        )

    def wait_ready(
        self, is_ready: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.05
    ) -> Self:
        """Poll ``is_ready`` until true; fail fast if the process exits, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if is_ready():
                return self
            if time.monotonic() > deadline:
                raise self.failure(f"not ready after {timeout_s:.0f} s")
            time.sleep(interval_s)

    def log_tail(self, lines: int = 40) -> str:
        return tail_lines(self.log_path, lines)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole group (a server's workers and helpers included)."""
        if self.proc is not None:
            signal_group(self.proc.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL what is left after ``timeout_s``; the exit code. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the child leads its own group
            signal_group(pgid, signal.SIGTERM)
            if not _wait_group_gone(proc, pgid, timeout_s):
                signal_group(pgid, signal.SIGKILL)
                _wait_group_gone(proc, pgid, 10.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if proc is None else proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, *, timeout_s: float = 2.0) -> int | None:
    """HTTP status of a GET, or None when nothing answered (loopback: never via a proxy)."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def is_http_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    return http_status(url, timeout_s=timeout_s) == 200


def tail_lines(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or a note that it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate_with_parent() -> None:
    """Runs in the child before exec: ask Linux for SIGTERM when the parent thread dies."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in the group (zombies cannot be killed)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # Fields after the ")" closing the command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _wait_group_gone(proc: subprocess.Popen[bytes], pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not _group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
