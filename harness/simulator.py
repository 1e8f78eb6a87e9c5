"""Simulated vLLM backends for tests and benches: in a thread of this process, or as a child
process (``python -m app.simulator``) so that the backend does not share the caller's CPU and GIL.
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.simulator.config import SimConfig, config_to_argv
from app.simulator.runner import UvicornServer
from app.simulator.server import create_app
from harness.asgi import HOST, ThreadedServer
from harness.ports import free_port
from harness.process import ChildServer, is_http_ok


class SimulatorThread(ThreadedServer):
    """A simulator in a daemon thread: ``with SimulatorThread(config) as sim: sim.url``."""

    def __init__(self, config: SimConfig | None = None, *, port: int = 0) -> None:
        self.config = config or SimConfig()
        self.app = create_app(self.config)
        # UvicornServer cuts in-flight generations at shutdown, as a stopped vLLM does.
        super().__init__(UvicornServer(self.app), port=port)


class SimulatorChild(ChildServer):
    """``python -m app.simulator`` in its own process group; ``start()`` waits for ``/health``."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        port: int | None = None,
        log_dir: Path | None = None,
        name: str = "simulator",
    ) -> None:
        self.config = config or SimConfig()
        port = port or free_port()
        argv = [sys.executable, "-m", "app.simulator", "--host", HOST, "--port", str(port)]
        argv += ["--log-level", "warning", *config_to_argv(self.config)]
        repo = str(Path(__file__).resolve().parents[1])
        super().__init__(name, argv, port=port, cwd=repo, log_dir=log_dir)

    def is_ready(self) -> bool:
        return is_http_ok(f"{self.url}/health", timeout_s=1.0)
