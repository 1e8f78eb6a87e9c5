"""Selection cost per decision as the pool grows: the sticky policy over 4, 64 and 256 simulated
backends, as the router pays it per request (`pool.candidates(model)` then `StickyBounded.choose`,
no I/O), median and p99 in µs, with the candidates scored per decision (bounded past
SCORE_ALL_UP_TO) and the cost relative to the smallest pool (flat: near 1).

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

from app.backends import BackendPool, VllmMetrics
from app.percentile import nearest_rank
from app.prefix import PrefixKeys
from app.routing import CostWeights, Ownership, RouteRequest, StickyBounded, scored_with_load
from bench.report import write_json

MODEL = "bench-model"
RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"


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
    """A `BackendPool` of `n` healthy backends with a spread of load, as a busy deployment's."""
    backends = BackendPool([f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(n)])
    for backend in backends.backends:
        backend.healthy = True
        backend.models = frozenset({MODEL})
        backend.in_flight = rng.randint(0, 24)
        backend.metrics = VllmMetrics(
            waiting=float(rng.randint(0, 3)),
            running=float(rng.randint(0, 32)),
            kv_usage=rng.random(),
        )
        backend.capacity = 32 if rng.random() < 0.8 else None
        backend.others = float(rng.randint(0, 8))
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
    backends = live_pool(n, rng)
    policy = StickyBounded(CostWeights())
    work = decisions(n, count, rng)

    def decide(request: RouteRequest, ownership: Ownership) -> Callable[[], object]:
        return lambda: policy.choose(request, backends.candidates(MODEL), ownership)

    calls = [decide(request, ownership) for request, ownership in work]
    timed_us(calls[:200])  # warm-up
    times_us = timed_us(calls)
    scored = [
        len(scored_with_load(request, backends.candidates(MODEL), ownership)[0])
        for request, ownership in work
    ]
    return {
        "backends": n,
        "decisions": count,
        "median_us": round(statistics.median(times_us), 2),
        "p99_us": round(nearest_rank(times_us, 0.99) or 0.0, 2),
        "per_backend_ns": round(statistics.median(times_us) * 1000 / n, 1),
        "scored_mean": round(statistics.fmean(scored), 2),
        "scored_max": max(scored),
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
    for r in rows:
        r["vs_smallest"] = round(r["median_us"] / rows[0]["median_us"], 2)
    print(
        f"{'backends':>8} {'median µs':>10} {'p99 µs':>10} {'ns/backend':>11} "
        f"{'scored':>7} {'max':>4} {'vs first':>9}"
    )
    for r in rows:
        print(
            f"{r['backends']:>8} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} "
            f"{r['per_backend_ns']:>11.1f} {r['scored_mean']:>7.1f} {r['scored_max']:>4} "
            f"{r['vs_smallest']:>8.2f}x"
        )
    result = {
        "python": sys.version.split()[0],
        "seed": args.seed,
        "timed": "pool.candidates(model) + StickyBounded.choose, per decision",
        "rows": rows,
    }
    write_json(args.json, result)
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
