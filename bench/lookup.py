"""What one ownership look-up in Redis costs the router, for each request-path client
(`REDIS_LOOKUP_CLIENT`: `lean`, the router's own link, against `redis-py`'s pipeline), through
`RedisStore.lookup` itself on a real Redis:

- loop turns: how many times the look-up's task waits its turn on a busy event loop. `--hogs`
  tasks each hold the loop 1 ms per turn (a router relaying that many streams), so a turn
  takes about `--hogs` ms and a look-up's wall time divided by it counts its waits;
- CPU µs: the router's CPU per look-up, one after another on an idle loop;
- 32 at once: the wall time of each of 32 concurrent look-ups on an idle loop (a burst).

Ratios are taken within the run (lean over redis-py); absolute figures depend on the machine.

    uv run python -m bench.lookup          # writes bench/results/lookup.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from app.ownership import RedisStore
from app.percentile import nearest_rank
from app.prefix import PrefixKeys
from app.redislink import redis_client
from app.resp import links_for
from bench.report import write_json
from bench.servers import DEFAULT_REDIS_URL
from harness.redis import redis_or_private

RESULTS = Path(__file__).resolve().parent / "results" / "lookup.json"
CLIENTS = ("lean", "redis-py")


def keys(i: int) -> PrefixKeys:
    return PrefixKeys(
        conversation=f"bench-c{i}", system=f"bench-s{i % 8}", prompt_chars=0, system_chars=0
    )


async def hog(stop: asyncio.Event, hold_s: float) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < hold_s:
            pass
        await asyncio.sleep(0)


async def measure(url: str, client: str, *, hogs: int, lookups: int) -> dict[str, Any]:
    redis = redis_client(url, 0.5)
    links = links_for(redis) if client == "lean" else None
    if client == "lean" and links is None:
        raise SystemExit(f"{url}: the lean link cannot reach it (TLS, a credential provider)")
    store = RedisStore(redis, url, ttl_s=60, timeout_s=5.0, retry_s=5.0, links=links)
    try:
        # Records to read (as the background writer writes them), and warm connections.
        await store._write_batch([(keys(i), f"b{i % 3}", 100, True) for i in range(64)])
        await asyncio.gather(*(store.lookup(keys(i)) for i in range(32)))

        # CPU per look-up, one after another.
        cpu = time.process_time()
        for i in range(lookups):
            await store.lookup(keys(i % 64))
        cpu_us = (time.process_time() - cpu) / lookups * 1e6

        # 32 at once on an idle loop.
        burst_ms: list[float] = []

        async def timed(i: int) -> None:
            start = time.perf_counter()
            await store.lookup(keys(i))
            burst_ms.append((time.perf_counter() - start) * 1000)

        for _ in range(20):
            await asyncio.gather(*(timed(i) for i in range(32)))

        # Loop turns under a busy loop.
        stop = asyncio.Event()
        tasks = [asyncio.create_task(hog(stop, 0.001)) for _ in range(hogs)]
        await asyncio.sleep(0.05)
        turn_ms: list[float] = []
        busy_ms: list[float] = []
        try:
            for i in range(30):
                start = time.perf_counter()
                await asyncio.sleep(0)
                turn_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await store.lookup(keys(i))
                busy_ms.append((time.perf_counter() - start) * 1000)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        turn = statistics.median(turn_ms)
        return {
            "client": client,
            "cpu_us_per_lookup": round(cpu_us, 1),
            "burst32_p50_ms": round(statistics.median(burst_ms), 2),
            "burst32_p99_ms": round(nearest_rank(sorted(burst_ms), 0.99) or 0.0, 2),
            "busy_loop_turn_ms": round(turn, 2),
            "busy_lookup_p50_ms": round(statistics.median(busy_ms), 2),
            "loop_turns": round(statistics.median(busy_ms) / turn, 2),
            "fallbacks": store.fallbacks,
        }
    finally:
        if links is not None:
            await links.aclose()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lookup", description=__doc__)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--hogs", type=int, default=20, help="tasks holding the loop 1 ms a turn")
    parser.add_argument("--lookups", type=int, default=3000, help="for the CPU figure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating; medians reported")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with redis_or_private(args.redis_url) as url:
        if url is None:
            print(f"no Redis at {args.redis_url} and no redis-server to start", file=sys.stderr)
            return 1
        runs = [
            uvloop.run(measure(url, client, hogs=args.hogs, lookups=args.lookups))
            for _ in range(args.rounds)
            for client in CLIENTS
        ]
    rows = []
    for client in CLIENTS:
        mine = [r for r in runs if r["client"] == client]
        row: dict[str, Any] = {"client": client, "rounds": mine}
        for field in mine[0]:
            if field not in ("client", "fallbacks"):
                row[field] = round(statistics.median(r[field] for r in mine), 2)
        row["fallbacks"] = sum(r["fallbacks"] for r in mine)
        rows.append(row)
    lean, plain = rows
    print(
        f"{'client':>9} {'CPU µs':>8} {'32 at once p50/p99 ms':>22} {'busy loop: turn ms':>19} "
        f"{'look-up ms':>11} {'turns':>6} {'fallbacks':>10}"
    )
    for r in rows:
        burst = f"{r['burst32_p50_ms']:.2f} / {r['burst32_p99_ms']:.2f}"
        print(
            f"{r['client']:>9} {r['cpu_us_per_lookup']:>8.1f} {burst:>22} "
            f"{r['busy_loop_turn_ms']:>19.2f} {r['busy_lookup_p50_ms']:>11.2f} "
            f"{r['loop_turns']:>6.2f} {r['fallbacks']:>10}"
        )
    ratios = {
        "cpu": round(lean["cpu_us_per_lookup"] / plain["cpu_us_per_lookup"], 2),
        "burst32_p50": round(lean["burst32_p50_ms"] / plain["burst32_p50_ms"], 2),
        "busy_lookup": round(lean["busy_lookup_p50_ms"] / plain["busy_lookup_p50_ms"], 2),
    }
    print(
        f"\nlean / redis-py: CPU x{ratios['cpu']}, 32 at once x{ratios['burst32_p50']}, "
        f"on a busy loop x{ratios['busy_lookup']} (medians of {args.rounds} alternating rounds)"
    )
    result = {
        "python": sys.version.split()[0],
        "redis_url": url,
        "hogs": args.hogs,
        "timed": "RedisStore.lookup (GET + HGETALL, one round trip), per client",
        "ratios_lean_over_redis_py": ratios,
        "rows": rows,
    }
    write_json(args.json, result)
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
