"""Fault load test: `uv run python -m bench.resilience`.

Holds a fixed concurrency of streaming chat requests through the router in front of N simulated
backends for a bounded time; in the middle one backend is killed (SIGKILL: connections reset, as
when a GPU box dies) and later started again on the same port. Prints requests sent, completed,
retried by the router, streams cut mid-way (ended with an error event), and failed. A request that
had not started streaming must never fail: the router retries it on another backend.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

from app.simulator.config import SimConfig
from bench.report import write_json
from bench.servers import MODEL, kvroute_server, start_server
from harness.simulator import SimulatorChild


async def one_request(
    session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, tally: Counter[str]
) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"request {i}"}],
    }
    tally["sent"] += 1
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                tally[f"failed_{resp.status}"] += 1
                return
    except (aiohttp.ClientError, TimeoutError):
        tally["failed_connection"] += 1
        return
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    if not events or events[-1] != b"data: [DONE]":
        tally["failed_unterminated"] += 1
    elif any(e.startswith(b'data: {"error"') for e in events):
        tally["cut_mid_stream"] += 1
    else:
        tally["completed"] += 1


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = SimConfig(
        model=MODEL,
        max_num_seqs=256,
        base_ttft_s=0.005,
        prefill_s_per_token=0.0,
        decode_tokens_per_s=args.decode_tokens_per_s,
    )
    sims = [SimulatorChild(config) for _ in range(args.backends)]
    for sim in sims:
        sim.start()
    log_dir = Path(tempfile.mkdtemp(prefix="kvroute-resilience-"))
    router = kvroute_server(
        [s.url for s in sims],
        log_dir,
        {"HEALTH_INTERVAL_S": "0.5", "RETRIES": "2", "UNHEALTHY_AFTER_FAILURES": "1"},
    )
    url = router.url
    tally: Counter[str] = Counter()
    timeline: list[str] = []
    try:
        await start_server(router)
        victim = sims[0]
        victim_port = victim.port
        start = time.monotonic()
        deadline = start + args.duration_s
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker(w: int) -> None:
                i = 0
                while time.monotonic() < deadline:
                    await one_request(session, url, w * 1_000_000 + i, args.max_tokens, tally)
                    i += 1

            async def chaos() -> None:
                await asyncio.sleep(args.duration_s * 0.3)
                victim.signal(signal.SIGKILL)
                await asyncio.to_thread(victim.stop)  # reaps it
                timeline.append(f"{time.monotonic() - start:5.1f} s  killed backend b0 (SIGKILL)")
                await asyncio.sleep(args.duration_s * 0.3)
                sims[0] = SimulatorChild(config, port=victim_port)
                await asyncio.to_thread(sims[0].start)
                timeline.append(f"{time.monotonic() - start:5.1f} s  b0 started again on its port")

            await asyncio.gather(chaos(), *(worker(w) for w in range(args.concurrency)))
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
            metrics = orjson.loads(await resp.read())
        served = []
        async with aiohttp.ClientSession() as session:
            for sim in sims:
                async with session.get(f"{sim.url}/sim/stats") as resp:
                    served.append(orjson.loads(await resp.read())["completed"])
    finally:
        router.stop(timeout_s=30)
        for sim in sims:
            sim.stop()
    failed = sum(n for k, n in tally.items() if k.startswith("failed"))
    result: dict[str, object] = {
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "sent": tally["sent"],
        "completed": tally["completed"],
        "cut_mid_stream": tally["cut_mid_stream"],
        "failed": failed,
        "failures": {k: n for k, n in tally.items() if k.startswith("failed")},
        "router_retries": metrics["retries"],
        "completed_by_revived_b0_after_restart": served[0],
        "timeline": timeline,
    }
    print(
        f"\nResilience: {args.backends} simulated backends, concurrency {args.concurrency}, "
        f"{args.duration_s:g} s, {args.max_tokens}-token streams"
    )
    for line in timeline:
        print(f"  {line}")
    for key in ("sent", "completed", "router_retries", "cut_mid_stream", "failed"):
        print(f"  {key:16} {result[key]}")
    print(f"  revived b0 served {served[0]} requests after its restart")
    print(
        "  (cut_mid_stream: streams that had started on the killed backend; they end with an "
        "OpenAI-style error event, the stats event and [DONE])"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.resilience", description=__doc__.split("\n")[0]
    )
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--decode-tokens-per-s", type=float, default=400.0)
    p.add_argument("--json", default="bench/results/resilience.json")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    write_json(Path(args.json), result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
