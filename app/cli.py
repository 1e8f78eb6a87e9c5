"""`kvroute serve | demo | deploy | sim | top`: the command line.

`serve` is what `main.py` runs. `demo` starts simulated vLLM backends in child processes and the
router in front of them, prints a curl command, and cleans up on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from types import FrameType

    import uvicorn

DEMO_MODEL = "demo-model"


# A SIGINT this soon after the first is the same Ctrl-C delivered twice (see `_Server`).
DUPLICATE_SIGINT_S = 1.0


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from app.api import create_app
    from app.listener import protocol_for

    loop = "uvloop" if sys.platform != "win32" else "asyncio"
    options: dict[str, object] = dict(
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=protocol_for(settings),
        ws="none",  # no WebSocket route: an Upgrade is a plain HTTP request, held to its limits
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        # JSON logs: uvicorn's own lines go through the root handler too (LOG_FORMAT).
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )
    if settings.workers > 1:
        # Each worker process builds its app from the same environment.
        os.environ.update(settings.environment())
        uvicorn.run(
            "app.api:create_app_from_env",
            factory=True,
            workers=settings.workers,
            **options,  # type: ignore[arg-type]
        )
        return
    config = uvicorn.Config(create_app(settings), **options)  # type: ignore[arg-type]
    server = server_class()(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's own code for a failed start-up, as `uvicorn.run` exits


def server_class() -> type[uvicorn.Server]:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT within DUPLICATE_SIGINT_S of the first is that same
        Ctrl-C: through `uv run` it arrives twice (the terminal signals the process group, uv
        passes its own on), and uvicorn takes a second SIGINT for "skip the graceful shutdown",
        so the app's own shutdown (draining streams, closing stores) was cut, at random."""

        first_exit_s: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            now = time.monotonic()
            if self.first_exit_s is None:
                self.first_exit_s = now
            elif sig == signal.SIGINT and now - self.first_exit_s < DUPLICATE_SIGINT_S:
                return
            super().handle_exit(sig, frame)

    return _Server


def _configure_logging(settings: Settings) -> None:
    from app.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def serve(overrides: dict[str, object]) -> int:
    try:
        settings = load_settings(**overrides)
        settings.require_backends()
        if settings.workers > 1 and not settings.redis_url:
            raise SettingsError(
                "invalid setting WORKERS: more than one worker needs REDIS_URL, "
                "so that the workers agree on prefix ownership"
            )
    except SettingsError as exc:
        print(f"kvroute: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    # uvicorn drains in-flight streams on SIGTERM, then re-raises the signal: end with 0.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        _run_uvicorn(settings)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupt_once() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt the first time and are ignored after, so the
    clean-up they start is not cut short: through `uv run`, Ctrl-C arrives twice (the terminal
    sends it to the process group, and uv passes its own on)."""
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def demo(port: int, backends: int, host: str) -> int:
    from app.simulator.config import SimConfig
    from app.simulator.runner import SimulatorProcess

    sims: list[SimulatorProcess] = []
    # SIGINT/SIGTERM become one KeyboardInterrupt, so cleanup runs; uvicorn re-raises the signals
    # it caught once it has shut down, which lands here too.
    _interrupt_once()
    try:
        for i in range(backends):
            sim = SimulatorProcess(SimConfig(model=DEMO_MODEL, seed=i))
            sim.start()
            sims.append(sim)
        try:
            settings = load_settings(
                backend_urls=[s.url for s in sims],
                served_model=DEMO_MODEL,
                host=host,
                port=port,
            )
        except SettingsError as exc:
            print(f"kvroute: {exc}", file=sys.stderr)
            return 2
        _configure_logging(settings)
        url = f"http://{host}:{port}"
        print(
            f"\nkvroute demo: router on {url} in front of {backends} simulated vLLM backends "
            f"({', '.join(s.url for s in sims)}); model {DEMO_MODEL!r}.\n"
            "The backends are simulators (no model runs): output text is filler, timings are modelled.\n"
            "Try:\n\n"
            f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -H 'X-Tenant-ID: demo-user' \\\n"
            f'    -d \'{{"model": "{DEMO_MODEL}", "stream": true, "max_tokens": 8, "messages": '
            '[{"role": "system", "content": "You are terse."}, '
            '{"role": "user", "content": "Hello!"}]}\'\n\n'
            f"  curl {url}/health    curl {url}/metrics    curl {url}/architecture\n\n"
            f"Live: {url}/dashboard in a browser, or `kvroute top --url {url}` in a terminal.\n\n"
            "Ctrl-C stops the router and the backends.\n",
            flush=True,
        )
        _run_uvicorn(settings)
    except KeyboardInterrupt:
        pass
    finally:
        for sim in sims:
            sim.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute", description="OpenAI-compatible KV-cache-aware router for vLLM"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the router (settings from the environment / .env)")
    serve_p.add_argument("--host", help="overrides HOST")
    serve_p.add_argument("--port", type=int, help="overrides PORT")
    demo_p = sub.add_parser("demo", help="run the router in front of simulated vLLM backends")
    demo_p.add_argument("--port", type=int, default=8080)
    demo_p.add_argument("--host", default="127.0.0.1")
    demo_p.add_argument("--backends", type=int, default=3)
    sub.add_parser("deploy", help="deploy vLLM on a GPU host over SSH (see `kvroute deploy -h`)")
    sub.add_parser("sim", help="run one simulated vLLM backend (see `kvroute sim -h`)")
    sub.add_parser("top", help="a running router's live figures in the terminal (`top -h`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "deploy":
        from app.deploy.command import main as deploy_main

        return int(deploy_main(args_list[1:]))
    if args_list and args_list[0] == "sim":
        from app.simulator.__main__ import main as sim_main

        return int(sim_main(args_list[1:]))
    if args_list and args_list[0] == "top":
        from app.top import main as top_main

        return top_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        return serve(overrides)
    if args.command == "demo":
        if args.backends < 1:
            print("kvroute: --backends must be at least 1", file=sys.stderr)
            return 2
        return demo(args.port, args.backends, args.host)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
