"""Selection cost per decision as the pool grows: the sticky policy over 4, 64 and 256 simulated
backends (`candidates_for` then `StickyBounded.choose`, pure, no I/O), median and p99 in µs.

    uv run python -m bench.selection            # writes bench/results/selection.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from app.backends import BackendPool, BackendView
from app.percentile import nearest_rank
from app.prefix import PrefixKeys
from app.routing import CostWeights, Ownership, RouteRequest, StickyBounded, candidates_for

MODEL = "bench-model"
RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"


def pool(n: int, rng: random.Random) -> tuple[BackendView, ...]:
    """`n` healthy backends with a spread of load, as a busy deployment's snapshot looks."""
    return tuple(
        BackendView(
            name=f"b{i}",
            url=f"http://10.0.{i // 250}.{i % 250}:8000",
            healthy=True,
            models=frozenset({MODEL}),
            in_flight=rng.randint(0, 24),
            waiting=float(rng.randint(0, 3)),
            running=float(rng.randint(0, 32)),
            kv_usage=rng.random(),
            capacity=32 if rng.random() < 0.8 else None,
            others=float(rng.randint(0, 8)),
        )
        for i in range(n)
    )


def decisions(n: int, count: int, rng: random.Random) -> list[tuple[RouteRequest, Ownership]]:
    """Requests of every kind: a third with an owner, a third with system homes only, a third
    new (the one where every backend ties on cost)."""
    out = []
    for i in range(count):
        keys = PrefixKeys(
            conversation=f"{rng.getrandbits(128):032x}",
            system=f"{rng.getrandbits(128):032x}",
            prompt_chars=8000,
            system_chars=4000,
        )
        request = RouteRequest(model=MODEL, keys=keys, prompt_tokens=2000, system_tokens=1000)
        homes = tuple(f"b{rng.randrange(n)}" for _ in range(2))
        kind = i % 3
        if kind == 0:
            ownership = Ownership(owner=homes[0], owner_tokens=1800, system_holders=homes)
        elif kind == 1:
            ownership = Ownership(system_holders=homes)
        else:
            ownership = Ownership()
        out.append((request, ownership))
    return out


def live_pool(n: int, rng: random.Random) -> BackendPool:
    """A `BackendPool` of `n` healthy backends, for the snapshot the router takes per request."""
    backends = BackendPool([f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(n)])
    for backend in backends.backends:
        backend.healthy = True
        backend.models = frozenset({MODEL})
        backend.in_flight = rng.randint(0, 24)
    return backends


def timed_us(calls: Sequence[Callable[[], object]]) -> list[float]:
    clock = time.perf_counter_ns
    times_us = []
    for call in calls:
        start = clock()
        call()
        times_us.append((clock() - start) / 1000)
    return sorted(times_us)


def measure(n: int, count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    snapshot = pool(n, rng)
    policy = StickyBounded(CostWeights())
    work = decisions(n, count, rng)
    for request, ownership in work[:200]:  # warm-up
        policy.choose(request, candidates_for(snapshot, MODEL), ownership)
    times_us: list[float] = []
    clock = time.perf_counter_ns
    for request, ownership in work:
        start = clock()
        policy.choose(request, candidates_for(snapshot, MODEL), ownership)
        times_us.append((clock() - start) / 1000)
    times_us.sort()
    # What the router also pays per request before choosing: the pool's snapshot.
    backends = live_pool(n, rng)
    snapshots_us = timed_us([backends.snapshot] * min(count, 2000))
    return {
        "backends": n,
        "decisions": count,
        "median_us": round(statistics.median(times_us), 2),
        "p99_us": round(nearest_rank(times_us, 0.99) or 0.0, 2),
        "per_backend_ns": round(statistics.median(times_us) * 1000 / n, 1),
        "snapshot_median_us": round(statistics.median(snapshots_us), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__)
    parser.add_argument("--backends", default="4,64,256", help="pool sizes, comma-separated")
    parser.add_argument("--decisions", type=int, default=6000, help="decisions per pool size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.backends.split(",") if v.strip()]
    rows = [measure(n, args.decisions, args.seed) for n in sizes]
    print(
        f"{'backends':>8} {'median µs':>10} {'p99 µs':>10} {'ns/backend':>11} {'snapshot µs':>12}"
    )
    for r in rows:
        print(
            f"{r['backends']:>8} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} "
            f"{r['per_backend_ns']:>11.1f} {r['snapshot_median_us']:>12.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"python": sys.version.split()[0], "seed": args.seed, "rows": rows}
    args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
