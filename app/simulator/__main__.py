"""`python -m app.simulator`: one simulated vLLM server in this process.

Prints `KVROUTE_SIMULATOR_LISTENING http://HOST:PORT` as its first stdout line once it accepts
connections (`--port 0` picks a free port); SIGTERM or Ctrl-C cut open streams and exit with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from app.simulator.config import SimConfig, parse_argv
from app.simulator.runner import LISTENING_PREFIX, UvicornServer, bind_socket, event_loop_factory
from app.simulator.server import create_app


def _request_exit(server: UvicornServer) -> None:
    if server.should_exit:
        server.force_exit = True  # second signal: stop waiting for connections
    server.should_exit = True


async def serve(args: argparse.Namespace, config: SimConfig) -> int:
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = UvicornServer(create_app(config), log_level=args.log_level)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _request_exit, server)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await serving
            return 1
        await asyncio.sleep(0.005)
    shown = f"[{host}]" if ":" in host else host
    print(f"{LISTENING_PREFIX}http://{shown}:{port}", flush=True)
    await serving
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_argv(argv)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve(args, config))


if __name__ == "__main__":
    sys.exit(main())
