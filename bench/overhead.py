"""The router's own cost: the same load straight at a backend, then through kvroute (and peers).

`uv run python -m bench.overhead [--quick] [--peers]` starts a simulated vLLM backend in no-delay
mode (a separate process), drives streaming chat at each concurrency first directly, then through
the router (`python main.py`, a separate process), then through each installed peer router, and
prints throughput, throughput ratio to direct, added TTFT and the CPU each process spent per request.
A scaling run (`WORKERS`=1, 2, 4 with Redis) and a short memory soak follow. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from app.simulator.config import SimConfig
from app.simulator.runner import event_loop_factory
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.peers import INSTALL_HINT, PEER_NAMES, missing_peers, peer_plans, peers_venv
from bench.report import write_json
from bench.servers import DEFAULT_REDIS_URL, MODEL, kvroute_server, peer_server, start_server
from harness.ports import free_port
from harness.process import ChildServer
from harness.redis import redis_or_private
from harness.simulator import SimulatorChild

DEFAULT_JSON = "bench/results/overhead.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --- processes, seen through /proc ---------------------------------------------------------------
def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now alive."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None:
            out[int(entry.name)] = int(fields[1])
    return out


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name (state first), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn's worker processes, spawn helpers)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in parents:
            tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (their live threads included)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_BYTES
        except OSError:
            continue
    return total


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def server_tree(server: ChildServer) -> list[int]:
    """The server's pid and its descendants, or none before it starts."""
    return process_tree(server.pid) if server.pid is not None else []


# --- one measured phase --------------------------------------------------------------------------
@dataclass(slots=True)
class Phase:
    target: str
    kind: str  # direct | kvroute | peer | scaling | soak
    load: LoadResult
    server_cpu_s: float | None
    backend_cpu_s: float
    others_cpu_s: float  # CPU used on the machine by processes outside this bench
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        s = self.load.summary()
        ok = max(s["ok"], 1)
        s.update(
            target=self.target,
            kind=self.kind,
            workers=self.workers,
            server_cpu_s=None if self.server_cpu_s is None else round(self.server_cpu_s, 3),
            server_cpu_s_per_1k=None
            if self.server_cpu_s is None
            else round(self.server_cpu_s / ok * 1000, 3),
            backend_cpu_s_per_1k=round(self.backend_cpu_s / ok * 1000, 3),
            loadgen_cpu_s_per_1k=round(self.load.cpu_s / ok * 1000, 3),
            others_cpu_share=round(self.others_cpu_s / max(self.load.wall_s, 1e-9), 3),
            **self.extra,
        )
        return s


async def measure(
    target: str,
    kind: str,
    spec: LoadSpec,
    server: ChildServer | None,
    backend: ChildServer,
    workers: int = 1,
) -> Phase:
    server_pids = server_tree(server) if server else []
    backend_pids = server_tree(backend)
    before: dict[str, float] = {}

    def snapshot() -> None:
        before["server"] = cpu_s(server_pids)
        before["backend"] = cpu_s(backend_pids)
        before["busy"] = machine_busy_s()[0]

    load = await run_load(spec, before_timed=snapshot)
    busy = machine_busy_s()[0] - before["busy"]
    server_cpu = cpu_s(server_pids) - before["server"] if server else None
    backend_cpu = cpu_s(backend_pids) - before["backend"]
    ours = (server_cpu or 0.0) + backend_cpu + load.cpu_s
    return Phase(
        target=target,
        kind=kind,
        load=load,
        server_cpu_s=server_cpu,
        backend_cpu_s=backend_cpu,
        others_cpu_s=max(busy - ours, 0.0),
        workers=workers,
    )


# --- the table -----------------------------------------------------------------------------------
def derive(rows: list[dict[str, Any]]) -> None:
    """Ratio and added TTFT of each row against the direct row of the same round and level."""
    direct = {(r["round"], r["concurrency"]): r for r in rows if r["kind"] == "direct"}
    for r in rows:
        base = direct.get((r["round"], r["concurrency"]))
        if r["kind"] == "direct" or base is None:
            r["ratio"] = 1.0 if r["kind"] == "direct" else None
            r["added_ttft_ms"] = None
            continue
        rate = base["requests_per_s"]
        r["ratio"] = round(r["requests_per_s"] / rate, 3) if rate else None
        added = {}
        for q in ("p50", "p99"):
            mine, theirs = r["ttft_ms"][q], base["ttft_ms"][q]
            added[q] = None if mine is None or theirs is None else round(mine - theirs, 3)
        r["added_ttft_ms"] = added


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, level): counts summed over rounds, every figure the rounds' median.

    Ratios and added TTFT are taken within a round (direct and router measured back to back),
    then their median, so that a burst of outside load moves both sides of one comparison."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["concurrency"]), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        row: dict[str, Any] = {
            "target": first["target"],
            "kind": first["kind"],
            "workers": first["workers"],
            "concurrency": first["concurrency"],
            "rounds": len(group),
            "requests": sum(r["requests"] for r in group),
            "ok": sum(r["ok"] for r in group),
            "tokens": sum(r["tokens"] for r in group),
            "loadgen_saturated": any(r["loadgen_saturated"] for r in group),
        }
        errors: dict[str, int] = {}
        for r in group:
            for key, count in r["errors"].items():
                errors[key] = errors.get(key, 0) + count
        row["errors"] = errors
        for key in (
            "wall_s",
            "requests_per_s",
            "tokens_per_s",
            "ratio",
            "server_cpu_s_per_1k",
            "backend_cpu_s_per_1k",
            "loadgen_cpu_s_per_1k",
            "loadgen_cpu_share",
            "others_cpu_share",
        ):
            row[key] = _median([r.get(key) for r in group])
        for key in ("ttft_ms", "total_ms"):
            row[key] = {q: _median([r[key][q] for r in group]) for q in group[0][key]}
        if first["added_ttft_ms"] is None:
            row["added_ttft_ms"] = None
        else:
            row["added_ttft_ms"] = {
                q: _median([(r["added_ttft_ms"] or {}).get(q) for r in group])
                for q in ("p50", "p99")
            }
        out.append(row)
    return out


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


COLUMNS = (
    ("target", 15, lambda r: r["target"]),
    ("c", 4, lambda r: str(r["concurrency"])),
    ("req", 6, lambda r: str(r["requests"])),
    ("err", 4, lambda r: str(r["requests"] - r["ok"])),
    ("req/s", 8, lambda r: _fmt(r["requests_per_s"])),
    ("tok/s", 8, lambda r: _fmt(r["tokens_per_s"], ".0f")),
    ("ratio", 6, lambda r: _fmt(r["ratio"], ".2f")),
    ("ttft p50", 9, lambda r: _fmt(r["ttft_ms"]["p50"], ".2f")),
    ("ttft p99", 9, lambda r: _fmt(r["ttft_ms"]["p99"], ".2f")),
    ("+p50 ms", 8, lambda r: _fmt((r["added_ttft_ms"] or {}).get("p50"), "+.2f")),
    ("+p99 ms", 8, lambda r: _fmt((r["added_ttft_ms"] or {}).get("p99"), "+.2f")),
    ("rtr cpu s/1k", 12, lambda r: _fmt(r["server_cpu_s_per_1k"], ".2f")),
    ("be cpu s/1k", 11, lambda r: _fmt(r["backend_cpu_s_per_1k"], ".2f")),
    ("gen cpu", 8, lambda r: _fmt(r["loadgen_cpu_share"] * 100, ".0f") + "%"),
    ("others", 7, lambda r: _fmt(r["others_cpu_share"] * 100, ".0f") + "%"),
)


def render_table(rows: list[dict[str, Any]]) -> str:
    header = " ".join(name.rjust(width) for name, width, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = " ".join(get(r).rjust(width) for _, width, get in COLUMNS)
        flag = "  <- load generator saturated" if r["loadgen_saturated"] else ""
        lines.append(cells + flag)
    return "\n".join(lines)


LEGEND = """\
req/s, tok/s: completed streams and streamed content tokens per second (timed part only)
ratio: req/s over direct at the same concurrency; +p50/+p99: TTFT minus direct's TTFT
rtr cpu s/1k: CPU seconds the router process tree spent per 1,000 requests (= ms per request)
be cpu s/1k: the same for the simulated backend; gen cpu: the load generator's share of one core
others: CPU used meanwhile by processes outside this bench (a noisy machine shows here)"""


# --- the run -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="The router's own cost against direct access and against peer routers.",
    )
    parser.add_argument("--concurrency", default="1,32,256", help="comma-separated levels")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, help="timed requests per phase")
    size.add_argument("--duration-s", type=float, help="seconds per phase (default 8)")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the grid; figures are medians, ratios taken within each round",
    )
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--peers", action="store_true", help="include installed peer routers")
    parser.add_argument(
        "--peer-names", default=",".join(("vllm-router", "sglang-router", "litellm"))
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run kvroute from another checkout (e.g. a `git worktree` of main) in the same run",
    )
    parser.add_argument("--workers", default="1,2,4", help="router processes in the scaling run")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling run")
    parser.add_argument(
        "--scaling-concurrency", type=int, help="load of the scaling run (default: the highest)"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="for WORKERS > 1")
    parser.add_argument(
        "--soak-s", type=float, default=30.0, help="sustained run for RSS; 600 is the full soak"
    )
    parser.add_argument("--soak-concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    args = parser.parse_args(argv)
    args.levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
    args.worker_counts = [int(v) for v in args.workers.split(",") if v.strip()]
    if args.quick:
        if args.requests is None and args.duration_s is None:
            args.duration_s = 2.0
        args.worker_counts = args.worker_counts[:2]
        args.soak_s = min(args.soak_s, 3.0)
    elif args.requests is None and args.duration_s is None:
        args.duration_s = 8.0
    if any(c < 1 for c in args.levels) or any(w < 1 for w in args.worker_counts):
        parser.error("--concurrency and --workers take positive integers")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def spec_for(
    args: argparse.Namespace, url: str, concurrency: int, headers: Mapping[str, str] | None = None
) -> LoadSpec:
    return LoadSpec(
        base_url=url,
        model=MODEL,
        concurrency=concurrency,
        requests=args.requests,
        duration_s=None if args.requests is not None else args.duration_s,
        max_tokens=args.tokens,
        headers=dict(headers or {}),
    )


# A router under test: its kind (kvroute, peer), the server, the headers each request carries.
Target = tuple[str, ChildServer, Mapping[str, str]]


async def start_peers(
    args: argparse.Namespace,
    urls: list[str],
    log_dir: Path,
    stack: contextlib.ExitStack,
    notes: list[str],
) -> list[Target]:
    """The installed peer routers that start (with --peers); a note for each one that does not."""
    if not args.peers:
        notes.append(f"peers not run (add --peers); to install them: {INSTALL_HINT}")
        return []
    peers: list[Target] = []
    only = [n.strip() for n in args.peer_names.split(",") if n.strip()]
    for plan in peer_plans(urls, MODEL, free_port, only=only):
        try:
            peer = await start_server(peer_server(plan, log_dir), stack, plan.headers)
        except (RuntimeError, TimeoutError) as exc:
            notes.append(f"peer {plan.name} did not start: {exc}")
            continue
        peers.append(("peer", peer, plan.headers))
        notes.append(f"peer {plan.name}: {plan.note}")
    for name in missing_peers(only=only):
        notes.append(f"peer {name} is not installed in {peers_venv()}; install: {INSTALL_HINT}")
    return peers


async def run_rounds(
    args: argparse.Namespace,
    targets: list[Target],
    backend: ChildServer,
    raw: list[dict[str, Any]],
    notes: list[str],
) -> set[str]:
    """Every round and level: direct, then each router; rows into ``raw``. The names of the
    routers that exited on the way."""
    dead: set[str] = set()
    for round_ in range(args.rounds):
        for level in args.levels:
            # Direct first, then the routers; odd rounds reverse the routers' order.
            order = targets if round_ % 2 == 0 else targets[::-1]
            phase = await measure(
                "direct", "direct", spec_for(args, backend.url, level), None, backend
            )
            raw.append({**phase.row(), "round": round_})
            _progress(raw[-1])
            for kind, server, headers in order:
                if server.name in dead:
                    continue
                spec = spec_for(args, server.url, level, headers)
                phase = await measure(server.name, kind, spec, server, backend)
                raw.append({**phase.row(), "round": round_})
                _progress(raw[-1])
                code = server.exit_code()
                if code is not None:
                    # Its rows from here on would measure connection errors; say so instead.
                    dead.add(server.name)
                    notes.append(
                        f"{server.name} exited with code {code} during round {round_} at "
                        f"c={level}; its later phases were skipped. Log: {server.log_path}"
                    )
    return dead


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="kvroute-bench-"))
    notes: list[str] = []
    raw: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    soak: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        backend = SimulatorChild(
            SimConfig(
                model=MODEL,
                no_delay=True,
                max_num_seqs=1024,
                default_max_tokens=args.tokens,
                capacity_blocks=1 << 16,
                log_size=0,
            ),
            log_dir=log_dir,
        )
        backend.start()
        stack.callback(backend.stop)
        urls = [backend.url]

        router = await start_server(kvroute_server(urls, log_dir), stack)
        router_rss_start = rss_bytes(server_tree(router))
        targets: list[Target] = [("kvroute", router, {})]
        if args.baseline:
            checkout = Path(args.baseline)
            baseline = await start_server(kvroute_server(urls, log_dir, checkout=checkout), stack)
            targets.append(("peer", baseline, {}))
            notes.append(f"{baseline.name}: kvroute from {checkout}, for a before/after")
        targets += await start_peers(args, urls, log_dir, stack, notes)
        dead = await run_rounds(args, targets, backend, raw, notes)

        if args.soak_s > 0 and router.name not in dead:
            soak = await run_soak(args, router, backend, router_rss_start)
        for kind, server, _headers in targets:
            if kind == "peer":
                server.stop()

        if not args.no_scaling and args.worker_counts:
            scaling, note = await run_scaling(args, urls, backend, log_dir)
            if note:
                notes.append(note)
    derive(raw)
    rows = aggregate(raw)
    rank = {name: i for i, name in enumerate(["direct", "kvroute", *PEER_NAMES])}
    rows.sort(key=lambda r: (r["concurrency"], rank.get(r["target"], 99)))
    if scaling:
        base = scaling[0]["requests_per_s"] or 1.0
        for r in scaling:
            r["speedup_vs_first"] = round(r["requests_per_s"] / base, 3)
    return {
        "meta": {
            "command": " ".join(["python -m bench.overhead", *sys.argv[1:]]),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "tokens": args.tokens,
            "concurrency": args.levels,
            "rounds": args.rounds,
            "requests_per_phase": args.requests,
            "duration_s_per_phase": args.duration_s,
            "logs": str(log_dir),
        },
        "rows": rows,
        "rounds": raw,
        "scaling": scaling,
        "soak": soak,
        "notes": notes,
    }


async def run_soak(
    args: argparse.Namespace, router: ChildServer, backend: ChildServer, rss_start: int
) -> dict[str, Any]:
    spec = LoadSpec(
        base_url=router.url,
        model=MODEL,
        concurrency=args.soak_concurrency,
        duration_s=args.soak_s,
        max_tokens=args.tokens,
        conversations=100_000,  # new prefix keys throughout: ownership grows until its TTL
    )
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        start = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - start, 1), rss_bytes(server_tree(router))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(args.soak_s / 20, 0.5))

    sampler = asyncio.create_task(sample())
    phase = await measure("kvroute soak", "soak", spec, router, backend)
    stop.set()
    await sampler
    row = phase.row()
    end = rss_bytes(server_tree(router))
    return {
        "duration_s": args.soak_s,
        "concurrency": args.soak_concurrency,
        "requests": row["requests"],
        "ok": row["ok"],
        "requests_per_s": row["requests_per_s"],
        "rss_mib_at_router_start": round(rss_start / 2**20, 1),
        "rss_mib_soak_start": round(samples[0][1] / 2**20, 1) if samples else None,
        "rss_mib_soak_end": round(end / 2**20, 1),
        "rss_mib_samples": [(t, round(b / 2**20, 1)) for t, b in samples],
    }


async def run_scaling(
    args: argparse.Namespace, urls: list[str], backend: ChildServer, log_dir: Path
) -> tuple[list[dict[str, Any]], str | None]:
    level = args.scaling_concurrency or max(args.levels)
    rows: list[dict[str, Any]] = []
    with redis_or_private(args.redis_url, log_dir) as redis_url:
        if redis_url is None:
            return [], f"scaling run skipped: no Redis at {args.redis_url} and no redis-server"
        for workers in args.worker_counts:
            with contextlib.ExitStack() as stack:
                server = kvroute_server(
                    urls, log_dir, {"WORKERS": str(workers), "REDIS_URL": redis_url}
                )
                await start_server(server, stack)
                phase = await measure(
                    server.name,
                    "scaling",
                    spec_for(args, server.url, level),
                    server,
                    backend,
                    workers,
                )
                row = phase.row()
                row["redis_url"] = redis_url
                if workers == 1:  # one process: its /metrics is the whole router's
                    row["ownership_fallbacks"] = await ownership_fallbacks(server.url)
                rows.append(row)
                _progress(row)
    return rows, None


async def ownership_fallbacks(url: str) -> dict[str, Any]:
    """Look-ups the router served from memory instead of Redis, in all and by cause."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "/metrics") as r,
    ):
        ownership = (await r.json())["ownership"]
    return {"total": ownership.get("fallbacks"), "by_cause": ownership.get("fallback_causes")}


def _progress(row: dict[str, Any]) -> None:
    print(
        f"  {row['target']:<15} c={row['concurrency']:<4} {row['requests_per_s']:>8.1f} req/s "
        f"ttft p50 {_fmt(row['ttft_ms']['p50'], '.2f')} ms  errors {row['requests'] - row['ok']}",
        file=sys.stderr,
        flush=True,
    )


def report(result: dict[str, Any]) -> str:
    out = [render_table(result["rows"]), "", LEGEND]
    if result["scaling"]:
        out += ["", "scaling (REDIS_URL shared ownership; one backend):"]
        for r in result["scaling"]:
            out.append(
                f"  workers={r['workers']}  c={r['concurrency']}  {r['requests_per_s']:.1f} req/s "
                f"(x{r['speedup_vs_first']:.2f})  router cpu {r['server_cpu_s_per_1k']:.2f} s/1k  "
                f"ttft p50 {_fmt(r['ttft_ms']['p50'], '.2f')} ms  errors {r['requests'] - r['ok']}"
                + (
                    f"  ownership fallbacks {r['ownership_fallbacks']['total']}"
                    if "ownership_fallbacks" in r
                    else ""
                )
            )
    soak = result["soak"]
    if soak:
        out += [
            "",
            f"memory: router RSS {soak['rss_mib_at_router_start']} MiB at start; "
            f"{soak['rss_mib_soak_start']} -> {soak['rss_mib_soak_end']} MiB over a "
            f"{soak['duration_s']:.0f} s soak at c={soak['concurrency']} "
            f"({soak['requests']} requests, {soak['requests_per_s']:.0f} req/s)",
        ]
    saturated = [r for r in result["rows"] if r["loadgen_saturated"]]
    if saturated:
        out.append(
            "\nWARNING: the load generator used most of a core in "
            + ", ".join(f"{r['target']} c={r['concurrency']}" for r in saturated)
            + ": those rows are bounded by the generator, not the server."
        )
    cpus = os.cpu_count() or 1
    if cpus < 4:
        out.append(
            f"\nNOTE: {cpus} CPUs: generator, backend and router share them, so a router's extra "
            "CPU shows up as lost throughput; the CPU-per-request columns are the portable figures."
        )
    out += ["", *result["notes"]]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        result = runner.run(run(args))
    text = report(result)
    print(text, flush=True)
    path = Path(args.json)
    write_json(path, result)
    print(f"\nresults: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
