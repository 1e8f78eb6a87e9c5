"""The router as a child process for tests: ``harness.router.RouterProcess`` polling its backends'
health and metrics every 0.3 s, so that tests see changes quickly."""

from __future__ import annotations

from collections.abc import Mapping

from harness import router

FAST_POLLING = {"HEALTH_INTERVAL_S": "0.3", "METRICS_INTERVAL_S": "0.3"}


class RouterProcess(router.RouterProcess):
    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__({**FAST_POLLING, **env})
