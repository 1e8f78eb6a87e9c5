"""The overhead bench runs end to end at its smallest size and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.loadgen import percentiles

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_percentiles_use_the_nearest_rank() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    values = [float(i) for i in range(1, 11)]
    assert percentiles(values) == {"p50": 5.0, "p90": 9.0, "p99": 10.0, "max": 10.0}


def test_overhead_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    argv = [sys.executable, "-m", "bench.overhead", "--concurrency", "2", "--requests", "6"]
    argv += ["--tokens", "8", "--no-scaling", "--soak-s", "0", "--json", str(out)]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    table = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["direct", "2"] for line in table), proc.stdout
    assert any(line.split()[:2] == ["kvroute", "2"] for line in table), proc.stdout
    assert "rtr cpu s/1k" in proc.stdout
    assert "peers not run" in proc.stdout

    result = json.loads(out.read_text())
    rows = {row["target"]: row for row in result["rows"]}
    assert set(rows) == {"direct", "kvroute"}
    for row in rows.values():
        assert row["concurrency"] == 2
        assert row["requests"] == row["ok"] == 6, row["errors"]
        assert row["tokens"] == 6 * 8
        assert row["requests_per_s"] > 0
        assert row["ttft_ms"]["p50"] > 0
    assert rows["direct"]["server_cpu_s_per_1k"] is None
    assert rows["direct"]["ratio"] == 1.0
    # Six requests may cost less than one clock tick (10 ms) of router CPU: present, not large.
    assert rows["kvroute"]["server_cpu_s_per_1k"] >= 0
    assert rows["kvroute"]["ratio"] > 0
    assert rows["kvroute"]["added_ttft_ms"] is not None
    assert result["scaling"] == []
    assert result["soak"] is None


def test_lookup_bench_smoke(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "lookup.json"
    argv = [sys.executable, "-m", "bench.lookup", "--redis-url", redis_url, "--rounds", "1"]
    argv += ["--hogs", "2", "--lookups", "200", "--json", str(out)]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lean / redis-py:" in proc.stdout
    result = json.loads(out.read_text())
    rows = {row["client"]: row for row in result["rows"]}
    assert set(rows) == {"lean", "redis-py"}
    for row in rows.values():
        assert row["fallbacks"] == 0  # a healthy Redis: every look-up answered by it
        assert row["cpu_us_per_lookup"] > 0
        assert 0 < row["burst32_p50_ms"] <= row["burst32_p99_ms"]
        assert row["loop_turns"] > 0
