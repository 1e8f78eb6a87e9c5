"""KV-cache locality benchmark: `uv run python -m bench.locality`.

Replays one seeded multi-tenant, multi-turn chat workload (skewed tenant popularity, many
conversations open at once taking turns, as users who think between turns) through the router in
front of N simulated vLLM backends (finite KV cache, a cap on running requests so a hot spot
queues as on a GPU), once per routing policy and once per KV size (tight, medium, loose by
default), and prints side by side: the cached-token ratio measured by the backends, that ratio as
a share of the workload's ideal (one backend with unlimited KV cache: every prompt token that an
earlier request already sent, or that an earlier answer produced, counts as cached), TTFT p50/p99
seen by the client, and the load spread (max/mean requests per backend). Loopback only; each
policy run is bounded by --timeout-s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from app.percentile import nearest_rank
from app.simulator.config import SimConfig
from app.simulator.prompt import render_chat, tokenize
from app.stream_stats import read_stats
from bench.peers import INSTALL_HINT, missing_peers, peer_plans
from bench.report import write_json
from bench.servers import DEFAULT_REDIS_URL, MODEL, kvroute_server, peer_server, start_server
from harness.ports import free_port
from harness.process import ChildServer
from harness.redis import redis_or_private
from harness.simulator import SimulatorChild

WORDS = [
    "cache",
    "prefix",
    "token",
    "block",
    "router",
    "backend",
    "latency",
    "tenant",
    "system",
    "prompt",
    "stream",
    "decode",
    "prefill",
    "queue",
    "memory",
    "model",
    "request",
    "answer",
    "question",
    "engine",
    "batch",
    "schedule",
    "expert",
    "layer",
    "attention",
    "vector",
    "matrix",
    "context",
    "window",
    "history",
    "summary",
    "policy",
    "contract",
    "invoice",
    "ticket",
    "customer",
    "order",
]


@dataclass(frozen=True)
class Workload:
    seed: int
    tenants: int
    systems_per_tenant: int
    conversations: int
    min_turns: int
    max_turns: int
    system_words: tuple[int, int]
    user_words: tuple[int, int]
    max_tokens: int
    tenant_skew: float = 0.0  # Zipf exponent of tenant popularity; 0 = uniform


@dataclass
class Conversation:
    tenant: str
    system: str
    user_turns: list[str]


def build_conversations(w: Workload) -> list[Conversation]:
    rng = random.Random(w.seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    systems = {
        (t, s): f"You are assistant {s} of tenant {t}. " + text(rng.randint(*w.system_words))
        for t in range(w.tenants)
        for s in range(w.systems_per_tenant)
    }
    # Tenant t is chosen with weight 1 / (t + 1) ** skew: real multi-tenant traffic is skewed, and
    # a popular tenant's system prompt is where pure prefix stickiness turns into a hot spot.
    weights = [1 / (t + 1) ** w.tenant_skew for t in range(w.tenants)]
    conversations = []
    for _ in range(w.conversations):
        tenant = rng.choices(range(w.tenants), weights)[0]
        system = systems[(tenant, rng.randrange(w.systems_per_tenant))]
        turns = [
            text(rng.randint(*w.user_words)) for _ in range(rng.randint(w.min_turns, w.max_turns))
        ]
        conversations.append(Conversation(f"tenant-{tenant}", system, turns))
    return conversations


@dataclass
class Sent:
    """One request as sent, in send order, and what came back."""

    messages: list[dict[str, str]]
    url: str = ""  # where it went (with several router replicas, which one)
    worker: int = 0  # the client worker (connection) that sent it
    answer: str = ""
    ttft_s: float | None = None
    status: int = 0
    stats: dict[str, Any] | None = None  # the router's stream_stats, when it sends them


@dataclass
class RunResult:
    policy: str
    requests: int
    failed: int
    cached_ratio: float
    ideal_ratio: float
    share_of_ideal: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    max_over_mean: float
    per_backend: list[int]
    wall_s: float
    # From each backend's own log: arrival there to first token (queue + prefill), which is what
    # routing decides, apart from the router's and the client's processes waiting for a core.
    backend_ttft_p50_ms: float = 0.0
    backend_ttft_p99_ms: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    lost_tokens: dict[str, int] = field(default_factory=dict)  # vs ideal, by outcome/affinity
    # Where the prompts were kept: backends per system prompt (its copies across the fleet, each
    # taking KV room from conversations) and conversations served by more than one backend.
    system_homes: float = 0.0
    moved_conversations: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each round's row, with --rounds


def ideal_cached(sent: Sequence[Sent], block_size: int = 16) -> list[tuple[int, int]]:
    """(prompt tokens, tokens cached) per request with one unlimited cache, in send order: full
    blocks an earlier request's prompt or answer already holds."""
    seen: set[int] = set()
    out = []
    for request in sent:
        prompt = render_chat(request.messages)
        tokens = tokenize(prompt)
        parent = 0
        matched = 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tokens[start : start + block_size]))
            if parent not in seen:
                break
            matched += block_size
        out.append((len(tokens), matched))
        # The prompt and its answer are cached afterwards, as the backend's blocks are.
        full = tokenize(prompt + request.answer)
        parent = 0
        for start in range(0, len(full) - block_size + 1, block_size):
            parent = hash((parent, full[start : start + block_size]))
            seen.add(parent)
    return out


def ideal_ratio(sent: Sequence[Sent], block_size: int = 16) -> float:
    """Cached share with one unlimited cache (see `ideal_cached`)."""
    return ratio_of(ideal_cached(sent, block_size))


def ratio_of(per_request: Sequence[tuple[int, int]]) -> float:
    prompt_total = sum(p for p, _ in per_request)
    return sum(c for _, c in per_request) / prompt_total if prompt_total else 0.0


def losses(ok: Sequence[Sent], ideal_per_request: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Ideal minus backend-reported cached tokens, summed by the router's outcome and affinity:
    where a policy loses locality. `ok`: the answered requests; needs the router's stats events."""
    out: dict[str, int] = {}
    for request, (_, ideal) in zip(ok, ideal_per_request, strict=True):
        if request.stats is None:
            continue
        key = f"{request.stats['cache_outcome']}/{request.stats['affinity']}"
        out[key] = out.get(key, 0) + ideal - int(request.stats["cached_tokens"])
    return out


def placement(ok: Sequence[Sent]) -> tuple[float, int]:
    """(mean backends per system prompt, conversations served by more than one backend), from
    the backend named in each answer's stats event; a conversation is its system prompt and
    first user turn."""
    conversations: dict[tuple[str, str], set[str]] = {}
    for request in ok:
        if request.stats is not None:
            key = (request.messages[0]["content"], request.messages[1]["content"])
            conversations.setdefault(key, set()).add(request.stats["backend"])
    homes: dict[str, set[str]] = {}  # a system prompt's homes: its conversations' backends
    for (system, _), backends in conversations.items():
        homes.setdefault(system, set()).update(backends)
    mean_homes = statistics.mean(len(h) for h in homes.values()) if homes else 0.0
    return round(mean_homes, 3), sum(len(c) > 1 for c in conversations.values())


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    tenant: str,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> tuple[int, str, float | None, dict[str, Any] | None]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
    start = time.monotonic()
    ttft = None
    stats = None
    pieces: list[str] = []
    async with session.post(url, json=body, headers={"X-Tenant-ID": tenant}) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status, "", None, None
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                found = read_stats(event)
                if found is not None:
                    stats = found
                    continue
                if not event.startswith(b"data: {"):
                    continue
                payload = orjson.loads(event[6:])
                for choice in payload.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if ttft is None:
                            ttft = time.monotonic() - start
                        pieces.append(content)
    return 200, "".join(pieces), ttft, stats


async def drive(
    url: str | Sequence[str],
    conversations: list[Conversation],
    concurrency: int,
    max_tokens: int,
    open_conversations: int = 0,
    *,
    pinned: bool = False,
    ramp_s: float = 0.0,
) -> list[Sent]:
    """Replay `conversations` with `concurrency` requests in flight.

    `open_conversations` (at least `concurrency`; 0 means equal) conversations are open at once
    and take turns in FIFO order, so a user "thinks" while other conversations' turns run, and
    their prefixes must stay cached meanwhile, as with real chat users. A conversation that ends
    makes room for the next one; a failed turn ends its conversation.

    Several URLs (router replicas): each of the `concurrency` client workers sends to one, in
    turn, as a load balancer spreads connections evenly; `pinned`, every turn of a conversation goes
    to the same one, its conversations dealt out in turn, as a load balancer with session
    affinity does.

    `ramp_s`: the workers start one after another over that many seconds instead of all at once,
    so the opening conversations do not all arrive within a few milliseconds of each other."""
    urls = [url] if isinstance(url, str) else list(url)
    sent: list[Sent] = []
    pending = list(enumerate(conversations))[::-1]
    ready: asyncio.Queue[tuple[int, Conversation, list[dict[str, str]], int]] = asyncio.Queue()

    def open_next() -> None:
        if pending:
            number, conv = pending.pop()
            ready.put_nowait((number, conv, [{"role": "system", "content": conv.system}], 0))

    for _ in range(max(open_conversations, concurrency)):
        open_next()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker(connection: int) -> None:
            if ramp_s:
                await asyncio.sleep(connection * ramp_s / concurrency)
            while not ready.empty():
                number, conv, history, turn = ready.get_nowait()
                messages = [*history, {"role": "user", "content": conv.user_turns[turn]}]
                url = urls[(number if pinned else connection) % len(urls)]
                record = Sent(messages, url, worker=connection)
                sent.append(record)
                status, answer, ttft, stats = await stream_chat(
                    session, record.url, conv.tenant, messages, max_tokens
                )
                record.status, record.answer, record.ttft_s = status, answer, ttft
                record.stats = stats
                if status == 200 and turn + 1 < len(conv.user_turns):
                    history = [*messages, {"role": "assistant", "content": answer}]
                    ready.put_nowait((number, conv, history, turn + 1))
                else:
                    open_next()

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sent


async def sim_stats(urls: list[str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        out = []
        for url in urls:
            async with session.get(f"{url}/sim/stats") as resp:
                out.append(await resp.json())
        return out


def backend_ttfts(stats: list[dict[str, Any]]) -> list[float]:
    """Every answered request's TTFT as its backend measured it, ms, sorted (the simulators keep
    a log of the run's requests: `log_size` covers the whole workload)."""
    return sorted(
        record["ttft_s"] * 1000
        for s in stats
        for record in s["log"]
        if record["ttft_s"] is not None and record["status"] == 200
    )


async def restart_sims(urls: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.post(f"{url}/sim/control", json={"restart": True}) as resp:
                resp.raise_for_status()


ONE_BACKEND = "one backend"
ONE_PROCESS = "kvroute (both levels)"
SAME_AGAIN = "kvroute again (A/A)"
ONE_REDIS = "kvroute x1 + Redis"
REPLICAS = "kvroute x2 + Redis"
REPLICAS_4 = "kvroute x4 + Redis"
REPLICAS_PRIVATE = "kvroute x2 + Redis without shared load"
NO_RETENTION = "kvroute without retention"
REPLICAS_NO_RETENTION = "kvroute x2 + Redis without retention"
SPLIT = "kvroute 2 replicas + Redis"
SPLIT_AFFINITY = "kvroute 2 replicas + Redis with session affinity"
SPLIT_4 = "kvroute 4 replicas + Redis"
SPLIT_CLAIM = "kvroute 2 replicas + Redis claiming first homes"
SPLIT_4_CLAIM = "kvroute 4 replicas + Redis claiming first homes"
# Rows run as router processes on ports of their own (not uvicorn workers sharing one, which the
# kernel hands connections unevenly): how many, and whether each conversation sticks to one.
SEPARATE: dict[str, tuple[int, bool]] = {
    SPLIT: (2, False),
    SPLIT_AFFINITY: (2, True),
    SPLIT_4: (4, False),
    SPLIT_CLAIM: (2, False),
    SPLIT_4_CLAIM: (4, False),
}


def layout(row: str) -> tuple[int, bool]:
    """A row's router processes on ports of their own, and whether conversations stick to one."""
    return SEPARATE.get(row, (1, False))


# The rows that need Redis.
SHARED = (ONE_REDIS, REPLICAS, REPLICAS_4, REPLICAS_PRIVATE, REPLICAS_NO_RETENTION, *SEPARATE)
COMPARED = (SAME_AGAIN, NO_RETENTION, *SHARED)  # the rows set against one process
# The router's own probes, fast enough for a short run.
ROUTER_ENV = {"METRICS_INTERVAL_S": "0.25", "HEALTH_INTERVAL_S": "1", "REDIS_URL": ""}
# Our router with both levels of affinity, as deployed by default. Defaults are set all the
# same, so that a setting in the caller's environment or .env cannot turn one row into another.
STICKY = {
    "ROUTING_POLICY": "sticky",
    "SYSTEM_AFFINITY": "true",
    "KV_RETENTION": "true",
    "FIRST_HOME_CLAIM": "false",
}


def replicas(
    workers: int, *, shared_load: bool = True, retention: bool = True, claim: bool = False
) -> dict[str, str]:
    """Router processes (uvicorn workers on one port, the kernel spreads the connections)
    agreeing on owners through Redis."""
    return {
        **STICKY,
        "WORKERS": str(workers),
        "SHARED_LOAD": str(shared_load).lower(),
        "KV_RETENTION": str(retention).lower(),
        "FIRST_HOME_CLAIM": str(claim).lower(),
    }


POLICIES: dict[str, dict[str, str]] = {
    # Every request to the first backend: what one backend's finite KV cache keeps of the workload
    # (the KV pressure the other rows relieve by spreading, or lose by hot-spotting).
    ONE_BACKEND: {"ROUTING_POLICY": "round_robin"},
    "round_robin": {"ROUTING_POLICY": "round_robin"},
    "least_loaded": {"ROUTING_POLICY": "least_loaded"},
    "conversation_key_only": {"ROUTING_POLICY": "sticky", "SYSTEM_AFFINITY": "false"},
    ONE_PROCESS: STICKY,
    # The same router again, a row of its own: how far two identical rows of one run land apart
    # (the noise floor of every comparison with one process below).
    SAME_AGAIN: STICKY,
    # One process with its ownership in Redis: what Redis itself costs, apart from replicas.
    ONE_REDIS: {**STICKY, "WORKERS": "1"},
    # Two and four processes sharing in-flight counts through Redis (the defaults): what several
    # replicas keep of the locality.
    REPLICAS: replicas(2),
    REPLICAS_4: replicas(4),
    # The same two, each counting only its own in-flight requests exactly and the other's as of
    # the last vLLM scrape (SHARED_LOAD=false): what sharing the counts buys.
    REPLICAS_PRIVATE: replicas(2, shared_load=False),
    # One and two processes that count an owner's cache in full, however much of it the owner
    # was measured to keep (KV_RETENTION=false): what retention buys, and what it buys replicas.
    NO_RETENTION: {**STICKY, "KV_RETENTION": "false"},
    REPLICAS_NO_RETENTION: replicas(2, retention=False),
    # Two and four processes behind an even spread of the client's connections, as behind a
    # load balancer; and two behind one with session affinity, which sends every turn of a
    # conversation to the same replica.
    **dict.fromkeys(SEPARATE, replicas(1)),
    # The same with new system prompts' first homes claimed in the look-up (FIRST_HOME_CLAIM).
    **dict.fromkeys((SPLIT_CLAIM, SPLIT_4_CLAIM), replicas(1, claim=True)),
}


async def run_policy(
    name: str,
    servers: Sequence[ChildServer],
    headers: dict[str, str],
    sims: list[str],
    conversations: list[Conversation],
    args: argparse.Namespace,
    tag: str,
) -> RunResult:
    """One policy: a cold fleet, its router (ours or a peer; or several replicas of ours, see
    SEPARATE), the whole workload, its tenants named with the round's `tag`."""
    await restart_sims(sims)
    with contextlib.ExitStack() as stack:
        for i, server in enumerate(servers):
            await start_server(server, stack, headers, forget=i == 0)
        await restart_sims(sims)  # the readiness probe's request must not warm any cache
        await asyncio.sleep(0.6)  # let the router's metrics poll see that restart first
        tagged = [replace(c, tenant=f"{c.tenant}@{tag}") for c in conversations]
        start = time.monotonic()
        sent = await asyncio.wait_for(
            drive(
                [f"{server.url}/v1/chat/completions" for server in servers],
                tagged,
                args.concurrency,
                args.max_tokens,
                args.open_conversations,
                pinned=layout(name)[1],
                ramp_s=args.ramp_s,
            ),
            timeout=args.timeout_s,
        )
        wall = time.monotonic() - start
    stats = await sim_stats(sims)
    prompt = sum(s["prompt_tokens_total"] for s in stats)
    cached = sum(s["cached_tokens_total"] for s in stats)
    per_backend = [s["completed"] for s in stats]
    ttfts = sorted(r.ttft_s * 1000 for r in sent if r.ttft_s is not None)
    at_backend = backend_ttfts(stats)
    ratio = cached / prompt if prompt else 0.0
    ok = [r for r in sent if r.status == 200]
    ideal_per_request = ideal_cached(ok)  # tokenises every prompt: once per run
    ideal = ratio_of(ideal_per_request)
    mean = statistics.mean(per_backend) if per_backend else 0
    homes, moved = placement(ok)
    return RunResult(
        policy=name,
        requests=len(sent),
        failed=sum(1 for r in sent if r.status != 200),
        cached_ratio=round(ratio, 4),
        ideal_ratio=round(ideal, 4),
        share_of_ideal=round(ratio / ideal, 4) if ideal else 0.0,
        ttft_p50_ms=round(nearest_rank(ttfts, 0.5) or 0.0, 1),
        ttft_p99_ms=round(nearest_rank(ttfts, 0.99) or 0.0, 1),
        max_over_mean=round(max(per_backend) / mean, 3) if mean else 0.0,
        per_backend=per_backend,
        wall_s=round(wall, 1),
        backend_ttft_p50_ms=round(nearest_rank(at_backend, 0.5) or 0.0, 1),
        backend_ttft_p99_ms=round(nearest_rank(at_backend, 0.99) or 0.0, 1),
        # From every answer's stats event (ours only), whichever router process served it.
        outcomes=dict(Counter(r.stats["cache_outcome"] for r in sent if r.stats)),
        lost_tokens=losses(ok, ideal_per_request),
        system_homes=homes,
        moved_conversations=moved,
    )


def print_table(
    results: list[RunResult], w: Workload, args: argparse.Namespace, capacity_blocks: int
) -> None:
    print(
        f"\nKV locality: {args.backends} simulated backends ({capacity_blocks} blocks x 16 tokens, "
        f"max_num_seqs {args.max_num_seqs}), {w.conversations} conversations of {w.min_turns}-{w.max_turns} "
        f"turns, {w.tenants} tenants x {w.systems_per_tenant} system prompts (tenant skew {w.tenant_skew}), {args.open_conversations} open conversations, concurrency {args.concurrency}{f' (ramp {args.ramp_s:g} s)' if args.ramp_s else ''}, "
        f"seed {w.seed}"
    )
    header = f"{'policy':24} {'reqs':>5} {'fail':>4} {'cached':>7} {'ideal':>6} {'share':>6} {'ttft p50':>9} {'ttft p99':>9} {'at bknd':>9} {'max/mean':>8}  per backend"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.policy:24} {r.requests:5d} {r.failed:4d} {r.cached_ratio:7.1%} {r.ideal_ratio:6.1%} "
            f"{r.share_of_ideal:6.1%} {r.ttft_p50_ms:7.1f}ms {r.ttft_p99_ms:7.1f}ms {r.backend_ttft_p99_ms:7.1f}ms {r.max_over_mean:8.2f}  {r.per_backend}"
        )
    for r in results:
        if r.lost_tokens:
            worst = sorted(r.lost_tokens.items(), key=lambda kv: -kv[1])
            print(f"  {r.policy}: tokens lost vs ideal by outcome/affinity: {dict(worst)}")
        if r.system_homes:
            print(
                f"  {r.policy}: backends per system prompt {r.system_homes:.2f}, "
                f"conversations moved {r.moved_conversations}"
            )
    for line in against_one_process(results):
        print(line)


def percent_change(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.1f} %" if base else "n/a"


def against_one_process(results: Sequence[RunResult]) -> list[str]:
    """What each Redis row keeps of one process's locality: share of ideal in points, TTFT p99
    in percent (the replicas' targets: within 0.5 points and 10 %), as the clients saw it and as
    the backends did (the part routing decides); and the same for the identical A/A row, the
    noise those figures carry."""
    one = next((r for r in results if r.policy == ONE_PROCESS), None)
    if one is None or not one.ttft_p99_ms:
        return []
    lines = []
    for r in results:
        if r.policy not in COMPARED:
            continue
        lines.append(
            f"  {r.policy} vs one process: share {100 * (r.share_of_ideal - one.share_of_ideal):+.2f} "
            f"points, ttft p99 {percent_change(r.ttft_p99_ms, one.ttft_p99_ms)} "
            f"(at the backends {percent_change(r.backend_ttft_p99_ms, one.backend_ttft_p99_ms)})"
        )
        if pairable(one.rounds, r.rounds):
            lines.append("    " + paired_rounds(one.rounds, r.rounds))
    return lines


# Student's t, two-sided 95 %, by degrees of freedom: a handful of rounds is a small sample.
T_975: tuple[float, ...] = (
    *(12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179),
    *(2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064),
    *(2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def pairable(one: Sequence[object], other: Sequence[object]) -> bool:
    """Whether two rows' rounds can be compared round by round: as many, and more than one."""
    return len(one) == len(other) > 1


def paired_interval(differences: Sequence[float]) -> tuple[float, float]:
    """The mean of per-round differences and the half-width of its 95 % interval. Rounds are
    paired: every row of a round replays the same tenants, one after the other, so a round's
    own luck (which conversations thrash, the machine's load then) cancels out."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return mean, math.inf
    t = T_975[n - 2] if n - 2 < len(T_975) else 2.0
    return mean, t * statistics.stdev(differences) / math.sqrt(n)


def paired_rounds(one: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> str:
    """A row against one process round by round: the mean difference in share of ideal with its
    95 % interval, and the TTFT p99 ratios' geometric mean with theirs. Medians of a few rounds
    hide how far apart rounds land; an interval that straddles a target says the run cannot
    tell, where a median alone would read as a pass or a miss."""
    pairs = list(zip(one, other, strict=True))
    share, share_half = paired_interval(
        [100 * (b["share_of_ideal"] - a["share_of_ideal"]) for a, b in pairs]
    )

    def ratio(field: str) -> str:
        logs = [math.log(b[field] / a[field]) for a, b in pairs if a[field] and b[field]]
        if len(logs) < 2:
            return "n/a"
        mean, half = paired_interval(logs)
        low, mid, high = (100 * (math.exp(x) - 1) for x in (mean - half, mean, mean + half))
        return f"{mid:+.1f} % ({low:+.1f} to {high:+.1f})"

    return (
        f"paired over {len(pairs)} rounds, mean (95 % interval): share {share:+.2f} "
        f"({share - share_half:+.2f} to {share + share_half:+.2f}) points, ttft p99 "
        f"{ratio('ttft_p99_ms')}, at the backends {ratio('backend_ttft_p99_ms')}"
    )


async def run_capacity(
    capacity_blocks: int,
    conversations: list[Conversation],
    args: argparse.Namespace,
) -> list[RunResult]:
    """Every policy (and the peers, with --peers) against one fleet of backends of this capacity."""
    config = SimConfig(
        model=MODEL,
        capacity_blocks=capacity_blocks,
        max_num_seqs=args.max_num_seqs,
        prefill_s_per_token=args.prefill_s_per_token,
        base_ttft_s=0.002,
        decode_tokens_per_s=args.decode_tokens_per_s,
        # Room for every request of a run on one backend (a restart empties the log).
        log_size=sum(len(c.user_turns) for c in conversations) + 64,
    )
    sims = [SimulatorChild(config) for _ in range(args.backends)]
    with contextlib.ExitStack() as stack:
        for sim in sims:
            stack.callback(sim.stop)
            sim.start()
        urls = [s.url for s in sims]
        wanted = [p.strip() for p in args.policies.split(",")] if args.policies else list(POLICIES)
        log_dir = Path(tempfile.mkdtemp(prefix="kvroute-locality-"))
        redis_url = None
        if any(name in wanted for name in SHARED):
            redis_url = stack.enter_context(redis_or_private(args.redis_url, log_dir))
            if redis_url is None:
                for name in SHARED:
                    if name in wanted:
                        print(f"  {name}: not run (no Redis at {args.redis_url})", file=sys.stderr)
                        wanted.remove(name)
        servers: list[tuple[str, list[ChildServer], dict[str, str]]] = [
            (
                name,
                [
                    kvroute_server(
                        urls[:1] if name == ONE_BACKEND else urls,
                        log_dir,
                        {
                            **POLICIES[name],
                            **ROUTER_ENV,
                            **({"REDIS_URL": redis_url or ""} if name in SHARED else {}),
                        },
                    )
                    for _ in range(layout(name)[0])
                ],
                {},
            )
            for name in wanted
        ]
        if args.peers:
            plans = peer_plans(urls, MODEL, free_port, only=("sglang-router", "vllm-router"))
            servers += [
                (f"{p.name} ({p.note.split(' (')[0]})", [peer_server(p, log_dir)], p.headers)
                for p in plans
            ]
            for missing in missing_peers(only=("sglang-router", "vllm-router")):
                print(f"  {missing}: not installed ({INSTALL_HINT})", file=sys.stderr)
        runs: dict[str, list[RunResult]] = {name: [] for name, _, _ in servers}
        for round_ in range(args.rounds):
            # Every row of a round replays the same tenants, so the same keys and hashes: rows
            # differ by their routing and the run's timing, not by which keys happened to tie or
            # collide. Each round draws new ones.
            tag = uuid.uuid4().hex[:8]
            # Odd rounds reverse the order, so no row always runs on a warmer or cooler machine.
            for name, processes, headers in servers if round_ % 2 == 0 else servers[::-1]:
                result = await run_policy(name, processes, headers, urls, conversations, args, tag)
                runs[name].append(result)
                print(
                    f"  done: {name}, {capacity_blocks} blocks, round {round_ + 1} "
                    f"({result.wall_s} s)",
                    file=sys.stderr,
                )
    return [median_row(rows) for rows in runs.values()]


def median_row(rows: list[RunResult]) -> RunResult:
    """One row for a policy's rounds: the median of each figure (a round's own figures are kept
    in `rounds`), requests and failures summed. One round is its own row."""
    if len(rows) == 1:
        return rows[0]

    def med(values: list[float], digits: int = 4) -> float:
        return round(statistics.median(values), digits)

    outcomes: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for r in rows:
        outcomes.update(r.outcomes)
        lost.update(r.lost_tokens)
    return RunResult(
        policy=rows[0].policy,
        requests=sum(r.requests for r in rows),
        failed=sum(r.failed for r in rows),
        cached_ratio=med([r.cached_ratio for r in rows]),
        ideal_ratio=med([r.ideal_ratio for r in rows]),
        share_of_ideal=med([r.share_of_ideal for r in rows]),
        ttft_p50_ms=med([r.ttft_p50_ms for r in rows], 1),
        ttft_p99_ms=med([r.ttft_p99_ms for r in rows], 1),
        backend_ttft_p50_ms=med([r.backend_ttft_p50_ms for r in rows], 1),
        backend_ttft_p99_ms=med([r.backend_ttft_p99_ms for r in rows], 1),
        max_over_mean=med([r.max_over_mean for r in rows]),
        per_backend=[sum(col) for col in zip(*(r.per_backend for r in rows), strict=True)],
        wall_s=round(sum(r.wall_s for r in rows), 1),
        outcomes=dict(outcomes),
        lost_tokens=dict(lost),
        system_homes=med([r.system_homes for r in rows], 3),
        moved_conversations=sum(r.moved_conversations for r in rows),
        rounds=[asdict(r) for r in rows],
    )


async def main_async(args: argparse.Namespace) -> dict[int, list[RunResult]]:
    workload = Workload(
        seed=args.seed,
        tenants=args.tenants,
        systems_per_tenant=args.systems_per_tenant,
        conversations=args.conversations,
        min_turns=2,
        max_turns=6,
        system_words=(250, 700),
        user_words=(20, 120),
        max_tokens=args.max_tokens,
        tenant_skew=args.tenant_skew,
    )
    conversations = build_conversations(workload)
    capacities = [int(c) for c in str(args.capacity_blocks).split(",")]
    by_capacity = {c: await run_capacity(c, conversations, args) for c in capacities}
    for capacity, results in by_capacity.items():
        print_table(results, workload, args, capacity)
    write_json(
        Path(args.json),
        {
            "workload": asdict(workload),
            "args": vars(args),
            "by_capacity_blocks": {
                str(c): [asdict(r) for r in results] for c, results in by_capacity.items()
            },
        },
    )
    print(f"\nJSON: {args.json}")
    return by_capacity


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.locality", description=__doc__.split("\n")[0])
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--conversations", type=int, default=240)
    p.add_argument("--tenants", type=int, default=6)
    p.add_argument("--systems-per-tenant", type=int, default=2)
    p.add_argument(
        "--tenant-skew", type=float, default=1.0, help="Zipf exponent of tenant popularity"
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument(
        "--open-conversations",
        type=int,
        default=96,
        help="conversations open at once, taking turns (users think between turns)",
    )
    p.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="start the client's workers one after another over this many seconds (0: at once)",
    )
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument(
        "--capacity-blocks",
        default="1400,2000,2600",
        help="KV capacity per backend in 16-token blocks; a comma-separated list runs each "
        "(tight, medium, loose KV pressure by default)",
    )
    p.add_argument("--max-num-seqs", type=int, default=8, help="running requests per backend")
    p.add_argument("--prefill-s-per-token", type=float, default=0.0001)
    p.add_argument("--decode-tokens-per-s", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--policies", default="", help="comma-separated subset of: " + ", ".join(POLICIES)
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="for the rows on Redis; a private redis-server is started when none answers",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times (odd rounds in reverse order) and print medians",
    )
    p.add_argument("--timeout-s", type=float, default=300.0, help="bound on each policy's run")
    p.add_argument("--json", default="bench/results/locality.json")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run SGLang's and vLLM's routers (cache_aware) from KVROUTE_PEERS_VENV",
    )
    p.add_argument(
        "--pool",
        nargs="+",
        metavar="JSON",
        help="run nothing: read these results files and print each row against one process, "
        "round by round, pooled over the files (e.g. one per seed)",
    )
    p.add_argument(
        "--baseline",
        default=ONE_PROCESS,
        metavar="ROW",
        help="with --pool: the row the others are compared with (default: one process, "
        "against the rows compared with it in a run; another row: against every other row)",
    )
    return p.parse_args(argv)


def pooled(paths: Sequence[Path], baseline: str = ONE_PROCESS) -> list[str]:
    """Earlier runs' results files read together: each row against `baseline` (one process by
    default, against which the rows it is compared with are COMPARED's; any other row is
    compared with every other row), its rounds paired within each run and each regime, pooled
    over all of them (several seeds' files make one estimate per row, with an interval a single
    seed's handful of rounds cannot give)."""
    pairs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for path in paths:
        for results in orjson.loads(path.read_bytes())["by_capacity_blocks"].values():
            by_name = {r["policy"]: r for r in results}
            base = by_name.get(baseline)
            if base is None:
                continue
            for name, r in by_name.items():
                wanted = name in COMPARED if baseline == ONE_PROCESS else name != baseline
                if wanted and pairable(base["rounds"], r["rounds"]):
                    bases, others = pairs.setdefault(name, ([], []))
                    bases.extend(base["rounds"])
                    others.extend(r["rounds"])
    against = "one process" if baseline == ONE_PROCESS else baseline
    return [
        f"  {name} vs {against}, {paired_rounds(bases, others)}"
        for name, (bases, others) in pairs.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pool:
        for line in pooled([Path(p) for p in args.pool], args.baseline):
            print(line)
        return 0
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
