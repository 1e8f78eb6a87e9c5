from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app.backends import (
    RETENTION_WEIGHT,
    BackendPool,
    VllmMetrics,
    is_restart,
    parse_vllm_metrics,
    retained,
)
from app.transport import MockRequest, MockResponse, MockTransport

REAL = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 11613.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 6656.0
vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7e9
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27648",num_gpu_blocks_override="None"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="27648"} 1.0
process_start_time_seconds 1.7956e+09
"""


def test_parses_real_names_and_sums_engines() -> None:
    m = parse_vllm_metrics(REAL)
    assert m == VllmMetrics(
        running=5.0,
        waiting=7.0,
        kv_usage=0.25,
        prefix_queries=11613.0,
        prefix_hits=6656.0,
        start_time_s=1.7956e9,
        kv_tokens=2 * 27648 * 16,
    )


@pytest.mark.parametrize(
    "line",
    [
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0',  # before profiling
        'vllm:cache_config_info{block_size="16"} 1.0',
        "vllm:cache_config_info 1.0",
        'vllm:cache_config_info{block_size="x",num_gpu_blocks="-5"} 1.0',
    ],
)
def test_a_cache_size_it_cannot_read_is_unknown(line: str) -> None:
    assert parse_vllm_metrics(line + "\n").kv_tokens == 0


def test_old_gpu_names_are_a_fallback() -> None:
    m = parse_vllm_metrics(
        'vllm:gpu_cache_usage_perc{model_name="x"} 0.5\nvllm:gpu_prefix_cache_queries_total 10\n'
    )
    assert m.kv_usage == 0.5
    assert m.prefix_queries == 10


def test_garbage_is_ignored() -> None:
    assert parse_vllm_metrics("vllm:num_requests_running{} nope\n\n#x\n") == VllmMetrics()


def test_restart_detection() -> None:
    a = VllmMetrics(prefix_queries=100, start_time_s=1.0)
    assert not is_restart(None, a)
    assert not is_restart(a, VllmMetrics(prefix_queries=150, start_time_s=1.0))
    assert is_restart(a, VllmMetrics(prefix_queries=150, start_time_s=2.0))
    assert is_restart(a, VllmMetrics(prefix_queries=10, start_time_s=None))


async def test_shared_peer_load_stands_for_others_while_fresh() -> None:
    now = [100.0]

    async def metrics(request: MockRequest) -> MockResponse:
        return MockResponse(chunks=[b"vllm:num_requests_running 5\nvllm:num_requests_waiting 2\n"])

    pool = BackendPool(["http://a:1", "http://b:1"], clock=lambda: now[0])
    for backend in pool.backends:
        backend.healthy = True
    pool.share_peer_load({"b1": 4.0}, fresh_s=1.0)
    assert [v.others for v in pool.snapshot()] == [0.0, 4.0]
    assert [v.peers for v in pool.snapshot()] == [0.0, 4.0]
    assert pool.get("b1").peers_until_s == 101.0
    await pool.probe_metrics(MockTransport(metrics), 1.0)  # the shared counts are current
    assert [(v.others, v.peers) for v in pool.snapshot()] == [(0.0, 0.0), (4.0, 4.0)]
    now[0] = 101.0  # no counts read since: a dead Redis does not leave them standing
    await pool.probe_metrics(MockTransport(metrics), 1.0)
    assert [(v.others, v.peers) for v in pool.snapshot()] == [(7.0, 0.0), (7.0, 0.0)]


def test_every_lease_and_release_tells_the_load_publisher() -> None:
    pool = BackendPool(["http://a:1"])
    told: list[int] = []
    pool.on_load_change = lambda: told.append(pool.get("b0").in_flight)
    with pool.lease("b0"), pool.lease("b0"):
        pass
    assert told == [1, 2, 1, 0]


def serving_pool(n: int) -> BackendPool:
    pool = BackendPool([f"http://10.0.0.{i}:8000" for i in range(n)], default_model="m")
    for backend in pool.backends:
        backend.healthy = backend.admitted = True
    return pool


def roster_names(pool: BackendPool, model: str = "m") -> list[str]:
    return [b.name for b in pool.roster(model).members]


def test_the_roster_is_kept_until_who_may_be_routed_to_changes() -> None:
    pool = serving_pool(3)
    roster = pool.roster("m")
    assert [b.name for b in roster.members] == ["b0", "b1", "b2"]
    assert pool.roster("m") is roster
    b1 = pool.get("b1")
    b1.healthy = True  # no change: nothing rebuilt
    b1.capacity, b1.others = 8, 1.0
    with pool.lease("b1"):  # load is read live, not cached
        assert pool.roster("m") is roster
        assert (roster.members[1].in_flight, roster.members[1].capacity) == (1, 8)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: setattr(p.get("b1"), "healthy", False), id="health"),
        pytest.param(lambda p: p.mark_failed("b1", "reset"), id="failed-request"),
        pytest.param(lambda p: p.drain("b1"), id="drain"),
        pytest.param(lambda p: setattr(p.get("b1"), "models", frozenset({"x"})), id="models"),
        pytest.param(lambda p: p.remove("b1"), id="removed"),
    ],
)
def test_the_roster_drops_a_backend_that_can_no_longer_take_the_model(
    change: Callable[[BackendPool], object],
) -> None:
    pool = serving_pool(3)
    assert roster_names(pool) == ["b0", "b1", "b2"]
    change(pool)
    assert roster_names(pool) == ["b0", "b2"]
    assert pool.candidates("m").find("b1") is None


def test_the_roster_takes_a_backend_once_it_serves() -> None:
    pool = serving_pool(2)
    assert roster_names(pool) == ["b0", "b1"]
    added = pool.add("http://10.0.0.9:8000")
    assert roster_names(pool) == ["b0", "b1"]  # probing: not yet
    added.healthy = True
    assert roster_names(pool) == ["b0", "b1", "b2"]
    pool.get("b0").models = frozenset({"m", "other"})
    assert roster_names(pool) == ["b0", "b1", "b2"]
    assert roster_names(pool, "other") == ["b0"]
    assert roster_names(pool, "unknown") == []


def test_leases_keep_the_rosters_in_flight_total() -> None:
    pool = serving_pool(3)
    roster = pool.roster("m")
    with pool.lease("b0"), pool.lease("b2"), pool.lease("b2"):
        assert roster.in_flight == 3
        pool.get("b2").healthy = False  # rebuilt from its members' counts
        assert pool.roster("m").in_flight == 1
        with pool.lease("b1"):
            assert pool.roster("m").in_flight == 2
        pool.get("b2").healthy = True
        assert pool.roster("m").in_flight == 3
    assert pool.roster("m").in_flight == 0
    assert sum(b.in_flight for b in pool.backends) == 0


async def test_the_probes_stop_when_cancelled_as_a_backend_arrives() -> None:
    """Cancelled (the app stopping) in the same loop turn as a new backend wakes the probes: on
    Python 3.11 `asyncio.wait_for` returned instead of raising there, and the probes never
    stopped."""

    async def down(request: MockRequest) -> MockResponse:
        return MockResponse(status=503)

    pool = BackendPool([], default_model="m")
    probes = asyncio.create_task(
        pool.run_probes(
            MockTransport(down), health_interval_s=60, metrics_interval_s=60, timeout_s=1
        )
    )
    await asyncio.sleep(0.05)  # the probes wait for their next turn
    pool.add("http://10.0.0.1:8000")
    probes.cancel()
    done, _ = await asyncio.wait([probes], timeout=2.0)
    assert done, "the probes did not stop"
    assert probes.cancelled()


async def test_a_restart_is_dated_from_the_last_scrape_of_the_old_process() -> None:
    """The callback learns how long ago the old process was last seen: what was stored on the
    backend since then may be on the new one (a Responses record is not called lost for it)."""
    now, started = [100.0], [1.0]
    seen: list[tuple[str, float]] = []

    async def metrics(request: MockRequest) -> MockResponse:
        now[0] += 0.5  # the scrape's round trip
        text = f"process_start_time_seconds {started[0]}\n"
        return MockResponse(chunks=[text.encode()])

    async def on_restart(name: str, since_s: float) -> None:
        seen.append((name, since_s))

    pool = BackendPool(["http://a"], on_restart=on_restart, clock=lambda: now[0])
    pool.get("b0").healthy = True
    await pool.probe_metrics(MockTransport(metrics), 1.0)  # sent at 100
    now[0] = 110.0
    await pool.probe_metrics(MockTransport(metrics), 1.0)  # same process, sent at 110
    assert seen == []
    now[0], started[0] = 113.0, 2.0
    await pool.probe_metrics(MockTransport(metrics), 1.0)  # a new one, answers at 113.5
    assert seen == [("b0", 3.5)]  # since the scrape sent at 110, which the old one answered
    assert pool.get("b0").generation == 1


def test_retention_moves_toward_the_share_found_cached() -> None:
    assert retained(1.0, 1000, 1000) == 1.0
    assert retained(1.0, 1000, 1200) == 1.0  # more than expected (another's prefix) is all of it
    assert retained(1.0, 1000, 0) == pytest.approx(1.0 - RETENTION_WEIGHT)
    assert retained(1.0, 1000, -5000) == retained(1.0, 1000, 0)  # a broken backend's figure
    level = 1.0
    for _ in range(200):  # a backend keeping 60 % of what it saw settles there
        level = retained(level, 1000, 600)
    assert level == pytest.approx(0.6, abs=1e-3)


def test_retention_is_learnt_only_from_backends_that_report_cached_tokens() -> None:
    pool = BackendPool(["http://a", "http://b"])
    a, b = pool.get("b0"), pool.get("b1")
    pool.note_cached("b0", 1000, None)  # vLLM without --enable-prompt-tokens-details
    assert (a.retention, a.reports_cached) == (1.0, False)
    pool.note_cached("b0", 1000, 500)
    assert a.reports_cached
    assert a.retention == pytest.approx(retained(1.0, 1000, 500))
    before = a.retention
    pool.note_cached("b0", 1000, None)  # once it reports, a missing figure is 0 cached
    assert a.retention == pytest.approx(retained(before, 1000, 0))
    pool.note_cached("b0", 0, 0)  # nothing expected: nothing learnt
    pool.note_cached("gone", 1000, 0)  # removed meanwhile
    assert a.retention == pytest.approx(retained(before, 1000, 0))
    assert (b.retention, b.view().retention) == (1.0, 1.0)
    assert a.view().retention == a.retention


async def test_a_restart_forgets_the_measured_retention() -> None:
    started = [1.0]

    async def metrics(request: MockRequest) -> MockResponse:
        return MockResponse(chunks=[f"process_start_time_seconds {started[0]}\n".encode()])

    pool = BackendPool(["http://a"])
    backend = pool.get("b0")
    backend.healthy = True
    await pool.probe_metrics(MockTransport(metrics), 1.0)
    pool.note_cached("b0", 1000, 100)
    assert backend.retention < 1.0
    started[0] = 2.0  # a new process: an empty cache, maybe other flags
    await pool.probe_metrics(MockTransport(metrics), 1.0)
    assert (backend.retention, backend.reports_cached) == (1.0, False)
