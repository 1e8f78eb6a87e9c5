"""The router as a child process (``python main.py`` configured by environment), for tests that
need separate router processes and for the benches."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from harness.ports import free_port
from harness.process import ChildServer, is_http_ok

MAIN = Path(__file__).resolve().parents[1] / "main.py"


class RouterProcess(ChildServer):
    """``RouterProcess(env).start()`` returns once ``/health`` answers 200 (a backend is up)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str = "kvroute",
        log_dir: Path | None = None,
        main: Path = MAIN,
    ) -> None:
        """`main`: another checkout's main.py runs that checkout's router (before/after runs)."""
        port = free_port()
        settings = {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning", **env}
        super().__init__(
            name,
            [sys.executable, str(main)],
            port=port,
            env={**os.environ, **settings},
            # Not the repo root: a developer's own .env there must not leak into the router.
            cwd=tempfile.gettempdir(),
            log_dir=log_dir,
        )

    def is_ready(self) -> bool:
        return is_http_ok(f"{self.url}/health", timeout_s=1.0)
