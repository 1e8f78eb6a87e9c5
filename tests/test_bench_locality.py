"""The locality bench: its workload, its driver and one small end-to-end run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.locality import (
    POLICIES,
    SHARED,
    Sent,
    Workload,
    build_conversations,
    drive,
    paired_interval,
    paired_rounds,
    placement,
    pooled,
)
from tests.conftest import running_simulators

REPO_ROOT = Path(__file__).resolve().parents[1]


def workload(**changes: object) -> Workload:
    base = {
        "seed": 5,
        "tenants": 6,
        "systems_per_tenant": 2,
        "conversations": 600,
        "min_turns": 2,
        "max_turns": 4,
        "system_words": (5, 10),
        "user_words": (3, 6),
        "max_tokens": 4,
    }
    return Workload(**{**base, **changes})  # type: ignore[arg-type]


def test_tenant_skew_makes_the_first_tenant_popular_and_zero_keeps_it_uniform() -> None:
    uniform = Counter(c.tenant for c in build_conversations(workload(tenant_skew=0.0)))
    skewed = Counter(c.tenant for c in build_conversations(workload(tenant_skew=1.5)))
    assert max(uniform.values()) < 0.25 * 600  # 1/6 expected per tenant
    assert skewed["tenant-0"] > 0.4 * 600  # 1 / sum(1/k^1.5, k=1..6) = 0.51 expected
    assert skewed["tenant-0"] > 3 * skewed["tenant-5"]
    assert build_conversations(workload(tenant_skew=1.5)) == build_conversations(
        workload(tenant_skew=1.5)
    )


def test_open_conversations_interleave_and_every_turn_extends_its_own_history() -> None:
    conversations = build_conversations(workload(conversations=5, min_turns=3, max_turns=3))
    with running_simulators(1, model="bench-model", decode_tokens_per_s=5000.0) as sims:
        url = f"{sims[0].url}/v1/chat/completions"
        sent = asyncio.run(drive(url, conversations, 2, 4, open_conversations=4))
    assert len(sent) == 15
    assert all(r.status == 200 for r in sent)
    # Each conversation's turns go out in order, each one carrying the previous turn and answer.
    openings = [i for i, r in enumerate(sent) if len(r.messages) == 2]
    assert len(openings) == 5
    for start in openings:
        first = sent[start]
        later = [r for r in sent[start + 1 :] if r.messages[:2] == first.messages]
        assert [len(r.messages) for r in later] == [4, 6]
        assert later[0].messages[2] == {"role": "assistant", "content": first.answer}
        assert later[1].messages[:5] == [
            *later[0].messages,
            {"role": "assistant", "content": later[0].answer},
        ]
    # Four conversations are open at once: the fourth opens before the first one ends.
    assert openings[:4] == [0, 1, 2, 3]
    last_of_first = max(i for i, r in enumerate(sent) if r.messages[:2] == sent[0].messages[:2])
    assert last_of_first > 3


def test_a_ramp_starts_the_workers_one_after_another() -> None:
    """Workers start `ramp_s / concurrency` apart: the last one 0.3 s in, so the run lasts at
    least that long, and each conversation is still sent whole."""
    conversations = build_conversations(workload(conversations=4, min_turns=1, max_turns=1))
    with running_simulators(1, model="bench-model", decode_tokens_per_s=5000.0) as sims:
        url = f"{sims[0].url}/v1/chat/completions"
        started = time.monotonic()
        sent = asyncio.run(drive(url, conversations, 4, 4, ramp_s=0.4))
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3
    assert len(sent) == 4
    assert all(r.status == 200 for r in sent)


def test_replicas_get_the_connections_in_turn_or_with_session_affinity_whole_conversations() -> (
    None
):
    conversations = build_conversations(workload(conversations=12, min_turns=3, max_turns=3))
    with running_simulators(2, model="bench-model", decode_tokens_per_s=5000.0) as sims:
        urls = [f"{sim.url}/v1/chat/completions" for sim in sims]
        spread = asyncio.run(drive(urls, conversations, 4, 4, open_conversations=8))
        pinned = asyncio.run(drive(urls, conversations, 4, 4, open_conversations=8, pinned=True))
    for sent in (spread, pinned):
        assert len(sent) == 36
        assert all(r.status == 200 for r in sent)

    def replicas_by_conversation(sent: list[Sent]) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for r in sent:
            seen.setdefault(r.messages[1]["content"], set()).add(r.url)
        return seen

    # Affinity: each conversation's turns all at one replica, conversations dealt out in turn.
    homes = replicas_by_conversation(pinned)
    assert all(len(replicas) == 1 for replicas in homes.values())
    assert Counter(next(iter(replicas)) for replicas in homes.values()) == {urls[0]: 6, urls[1]: 6}
    # Without it, a client's four workers send to the two replicas in turn: both get a share,
    # and where a turn goes is its worker's replica, not its conversation's (the next turn goes
    # with whichever worker is free; whether one crosses in a given run is the scheduler's call,
    # which a run here once made for none).
    per_replica = Counter(r.url for r in spread)
    assert set(per_replica) == set(urls)
    assert min(per_replica.values()) >= 9
    assert {r.worker for r in spread} == {0, 1, 2, 3}
    assert all(r.url == urls[r.worker % 2] for r in spread)
    assert {r.worker for r in pinned} == {0, 1, 2, 3}  # with affinity, not the worker's replica:
    assert any(r.url != urls[r.worker % 2] for r in pinned)


AFFINITY = "kvroute 2 replicas + Redis with session affinity"
CLAIM = "kvroute 2 replicas + Redis claiming first homes"


def test_only_the_claiming_rows_claim_first_homes() -> None:
    """Set in every replicas row, so that the caller's environment cannot turn one into another."""
    claiming = {row for row, env in POLICIES.items() if env.get("FIRST_HOME_CLAIM") == "true"}
    assert claiming == {CLAIM, "kvroute 4 replicas + Redis claiming first homes"}
    assert all(POLICIES[row]["FIRST_HOME_CLAIM"] in ("true", "false") for row in SHARED)


def run_bench(tmp_path: Path, capacities: str, rows: list[str], *extra: str) -> tuple[str, Any]:
    """A small bench run (six conversations); its output and its JSON, each row checked for what
    holds of any row."""
    out = tmp_path / "locality.json"
    argv = [sys.executable, "-m", "bench.locality", "--conversations", "6", "--concurrency", "2"]
    argv += ["--open-conversations", "3", "--capacity-blocks", capacities, "--max-tokens", "4"]
    argv += ["--policies", ",".join(rows), "--json", str(out), *extra]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert set(result["by_capacity_blocks"]) == set(capacities.split(","))
    for results in result["by_capacity_blocks"].values():
        assert [row["policy"] for row in results] == rows
        for row in results:
            assert row["failed"] == 0
            assert row["requests"] >= 12
            assert 0 < row["ideal_ratio"] <= 1
            assert 0 <= row["cached_ratio"] <= row["ideal_ratio"]
            assert sum(row["per_backend"]) == row["requests"]
            # The backends' own TTFT (arrival there to first token) is inside the client's.
            assert 0 < row["backend_ttft_p50_ms"] <= row["backend_ttft_p99_ms"]
            assert row["backend_ttft_p99_ms"] <= row["ttft_p99_ms"]
            # Every conversation's follow-up turns reach the backend that holds it.
            assert row["outcomes"]["hit"] == row["requests"] - 6, row["outcomes"]
            assert row["moved_conversations"] == 0
            assert 1 <= row["system_homes"] <= 3  # three backends
    return proc.stdout, result


def test_locality_bench_runs_each_capacity_on_a_fleet_of_its_own(tmp_path: Path) -> None:
    stdout, result = run_bench(tmp_path, "300,600", ["one backend", "kvroute (both levels)"])
    assert "(300 blocks x 16 tokens" in stdout
    assert "(600 blocks x 16 tokens" in stdout
    for one, _ours in result["by_capacity_blocks"].values():
        assert one["per_backend"][1:] == [0, 0]


def test_locality_bench_sets_replicas_on_redis_against_one_process(
    tmp_path: Path, redis_url: str
) -> None:
    """Every row of a round replays the same tenants: the second Redis row starts from an empty
    Redis (the first row's owners, on backends restarted since, would count as hits)."""
    against = ["kvroute x2 + Redis", "kvroute x1 + Redis", "kvroute again (A/A)", AFFINITY, CLAIM]
    stdout, _ = run_bench(
        tmp_path, "300", ["kvroute (both levels)", *against], "--redis-url", redis_url
    )
    for row in against:  # the identical A/A row too; AFFINITY: two processes, on two ports
        assert stdout.count(f"  {row} vs one process: share ") == 1, stdout


def test_placement_counts_each_system_prompts_homes_and_the_conversations_that_moved() -> None:
    def sent(system: str, first: str, backend: str) -> Sent:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
        return Sent(messages, status=200, stats={"backend": backend})

    ok = [
        sent("A", "hi", "b0"),
        sent("A", "hi", "b1"),  # the same conversation, moved
        sent("A", "yo", "b0"),
        sent("B", "hi", "b2"),
        Sent([{"role": "system", "content": "C"}, {"role": "user", "content": "x"}], status=200),
    ]
    # A on two backends, B on one (C has no stats event: not counted); one conversation moved.
    assert placement(ok) == (1.5, 1)
    assert placement([]) == (0.0, 0)


def test_rounds_are_compared_in_pairs_with_a_t_interval() -> None:
    mean, half = paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert abs(half - 4.303 / 3**0.5) < 1e-9  # t(0.975, 2 df) * stdev 1 / sqrt(3)
    assert paired_interval([0.5]) == (0.5, float("inf"))

    def round_(share: float, p99: float) -> dict[str, float]:
        return {"share_of_ideal": share, "ttft_p99_ms": p99, "backend_ttft_p99_ms": p99 / 2}

    one = [round_(0.97, 200.0), round_(0.98, 100.0), round_(0.96, 150.0)]
    # Every round 1 point lower and 10 % slower: no spread, so the interval is the mean itself.
    other = [round_(r["share_of_ideal"] - 0.01, r["ttft_p99_ms"] * 1.1) for r in one]
    line = paired_rounds(one, other)
    assert "paired over 3 rounds" in line
    assert "share -1.00 (-1.00 to -1.00) points" in line
    assert "ttft p99 +10.0 % (+10.0 to +10.0)" in line
    assert "at the backends +10.0 % (+10.0 to +10.0)" in line


def test_results_files_pool_each_rows_rounds_against_one_process(tmp_path: Path) -> None:
    """Two runs (say two seeds), each pairing its own rounds: pooled, the row is 0.5 points
    down in every one of its four rounds; a row with one round only has nothing to pair."""

    def round_(share: float) -> dict[str, float]:
        return {"share_of_ideal": share, "ttft_p99_ms": 100.0, "backend_ttft_p99_ms": 90.0}

    def row(policy: str, shares: list[float]) -> dict[str, object]:
        return {"policy": policy, "rounds": [round_(s) for s in shares]}

    paths = []
    for i, base in enumerate((0.97, 0.99)):
        results = [
            row("kvroute (both levels)", [base, base - 0.01]),
            row("kvroute x2 + Redis", [base - 0.005, base - 0.015]),
            row("kvroute x4 + Redis", [base]),
        ]
        paths.append(tmp_path / f"seed{i}.json")
        paths[-1].write_text(json.dumps({"by_capacity_blocks": {"1400": results}}))
    lines = pooled(paths)
    assert len(lines) == 1, lines
    assert lines[0].startswith("  kvroute x2 + Redis vs one process, paired over 4 rounds")
    assert "share -0.50 (-0.50 to -0.50) points" in lines[0]
    assert "ttft p99 +0.0 % (+0.0 to +0.0)" in lines[0]
    # Against another row: every other pairable row, one process included (turned around).
    lines = pooled(paths, baseline="kvroute x2 + Redis")
    assert len(lines) == 1, lines
    assert lines[0].startswith("  kvroute (both levels) vs kvroute x2 + Redis, paired over 4")
    assert "share +0.50 (+0.50 to +0.50) points" in lines[0]
    assert pooled(paths, baseline="no such row") == []
