from __future__ import annotations

from app.backends import VllmMetrics, is_restart, parse_vllm_metrics

REAL = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 11613.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 6656.0
vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7e9
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
    )


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


def test_shared_peer_load_stands_for_others_while_fresh() -> None:
    from app.backends import BackendPool

    now = [100.0]
    pool = BackendPool(["http://a:1", "http://b:1"], clock=lambda: now[0])
    pool.share_peer_load({"b1": 4.0}, fresh_s=1.0)
    assert [v.others for v in pool.snapshot()] == [0.0, 4.0]
    assert pool.get("b1").peers_until_s == 101.0
