"""The locality bench: its workload, its driver and one small end-to-end run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.locality import Workload, build_conversations, drive
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


def test_locality_bench_runs_each_capacity_with_one_backend_and_two_replicas(
    tmp_path: Path, redis_url: str
) -> None:
    """Every row of a round replays the same tenants: the second Redis row starts from an empty
    Redis (the first row's owners, on backends restarted since, would count as hits)."""
    out = tmp_path / "locality.json"
    argv = [sys.executable, "-m", "bench.locality", "--conversations", "6", "--concurrency", "2"]
    argv += ["--open-conversations", "3", "--capacity-blocks", "300,600", "--max-tokens", "4"]
    rows = "one backend,kvroute (both levels),kvroute x2 + Redis,kvroute x1 + Redis"
    argv += ["--policies", f"{rows},kvroute again (A/A)"]
    argv += ["--redis-url", redis_url, "--json", str(out)]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(300 blocks x 16 tokens" in proc.stdout
    assert "(600 blocks x 16 tokens" in proc.stdout
    # The Redis rows and the identical A/A row are set against one process, in both regimes.
    for row in ("kvroute x2 + Redis", "kvroute x1 + Redis", "kvroute again (A/A)"):
        assert proc.stdout.count(f"  {row} vs one process: share ") == 2, proc.stdout

    result = json.loads(out.read_text())
    assert set(result["by_capacity_blocks"]) == {"300", "600"}
    for rows in result["by_capacity_blocks"].values():
        one, ours, replicas, one_on_redis, again = rows
        assert one["policy"] == "one backend"
        assert ours["policy"] == "kvroute (both levels)"
        assert replicas["policy"] == "kvroute x2 + Redis"
        assert one_on_redis["policy"] == "kvroute x1 + Redis"
        assert again["policy"] == "kvroute again (A/A)"
        for row in rows:
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
        assert one["per_backend"][1:] == [0, 0]
