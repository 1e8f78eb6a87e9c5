"""RouterMetrics: fixed-bucket histograms, the decisions ring, and the Prometheus exposition as
prometheus_client's parser reads it (our promtool); the Grafana dashboard and the scrape snippet
in docs/ only name metrics the router exports."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import (
    RECENT_DECISIONS,
    TTFT_BUCKETS_S,
    Histogram,
    RequestRecord,
    RequestScope,
    RouterMetrics,
)
from tests.conftest import RouterServer, running_router, running_simulators, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROM_ACCEPT = {"Accept": "text/plain;version=0.0.4"}
# Every label name the router may put on a metric: all bounded sets.
ALLOWED_LABELS = {"endpoint", "status", "kind", "backend", "outcome", "model", "cache_outcome"}
ALLOWED_LABELS |= {"reason", "le", "action"}


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content},
        ],
        **extra,
    }


def scrape(router: RouterServer) -> dict[str, Metric]:
    resp = httpx.get(f"{router.url}/metrics", headers=PROM_ACCEPT)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def exported_series(families: dict[str, Metric]) -> set[str]:
    """The series names a PromQL query may use, from each family's name and type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    return {f.name + s for f in families.values() for s in suffixes.get(f.type, ("",))}


# --- pure --------------------------------------------------------------------------------
def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(("b0",), value)
    family = h.family("x_seconds", "x", ["backend"])
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 4, "+Inf": 5}
    sums = {s.name: s.value for s in family.samples if s.name != "x_seconds_bucket"}
    assert sums == {"x_seconds_count": 5, "x_seconds_sum": pytest.approx(4.65)}


def test_record_feeds_histograms_ring_and_listener() -> None:
    seen: list[RequestRecord] = []
    m = RouterMetrics(on_record=seen.append)
    scope = RequestScope("req-1", started_s=0.0, tenant="acme", model="m")
    m.record(
        RequestRecord(
            endpoint="chat",
            status=200,
            backend="b0",
            outcome="hit",
            affinity="conversation",
            ttft_ms=12.0,
            tps=50.0,
            stream=True,
            scope=scope,
        )
    )
    m.record(RequestRecord(endpoint="chat", status=400, error_kind="BadRequest"))
    assert len(seen) == 2
    assert seen[0].duration_s is not None
    assert seen[0].duration_s > 0
    labels = ("b0", "m", "hit")
    assert sum(m.ttft_s.series[labels][:-1]) == 1
    assert m.tpot_s.series[labels][-1] == pytest.approx(0.02)
    assert m.ttft_s.series[labels][TTFT_BUCKETS_S.index(0.025)] == 1
    # Requests refused before a backend feed no histogram and no decision.
    assert list(m.duration_s.series) == [labels]
    assert len(m.recent) == 1
    decision = m.recent[0]
    assert (decision.tenant, decision.backend, decision.outcome, decision.ttft_ms) == (
        "acme",
        "b0",
        "hit",
        12.0,
    )


def test_decisions_ring_is_bounded() -> None:
    m = RouterMetrics()
    for i in range(RECENT_DECISIONS + 10):
        m.record(RequestRecord(endpoint="chat", status=200, backend=f"b{i % 3}", outcome="miss"))
    assert len(m.recent) == RECENT_DECISIONS
    assert m.requests[("chat", 200)] == RECENT_DECISIONS + 10


# --- exposition over HTTP ------------------------------------------------------------------
def test_prometheus_exposition_families_and_labels(router: RouterServer) -> None:
    tenant = "tenant-never-a-label"
    keys = set()
    for _ in range(3):  # one conversation: a miss, then hits
        body = chat("same conversation", stream=True)
        resp = httpx.post(
            f"{router.url}/v1/chat/completions", json=body, headers={"X-Tenant-ID": tenant}
        )
        keys |= set(re.findall(r'"prefix_key":"([0-9a-f]+)"', resp.text))
    assert len(keys) == 1
    httpx.post(f"{router.url}/v1/chat/completions", json=chat("whole")).raise_for_status()
    assert (
        httpx.post(
            f"{router.url}/v1/chat/completions", json={**chat("x"), "model": "nope"}
        ).status_code
        == 404
    )
    wait_for(lambda: router.router.pool.backends[0].metrics is not None)

    resp = httpx.get(f"{router.url}/metrics", headers=PROM_ACCEPT)
    assert tenant not in resp.text  # neither a tenant nor a prefix key is ever a label
    assert keys.pop() not in resp.text
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    types = {name: f.type for name, f in families.items()}
    assert types["kvroute_requests"] == "counter"
    for name in (
        "kvroute_ttft_seconds",
        "kvroute_time_per_output_token_seconds",
        "kvroute_request_duration_seconds",
    ):
        assert types[name] == "histogram", name
    for name in (
        "kvroute_spills",
        "kvroute_reassignments",
        "kvroute_admission_rejections",
        "kvroute_fleet_changes",
    ):
        assert types[name] == "counter", name
    for name in (
        "kvroute_backend_in_flight",
        "kvroute_backend_owned_keys",
        "kvroute_backend_kv_cache_usage_ratio",
        "kvroute_backend_waiting_requests",
    ):
        assert types[name] == "gauge", name
    for family in families.values():
        assert family.name.startswith("kvroute_")
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)

    by_status = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in families["kvroute_requests"].samples
        if s.name == "kvroute_requests_total"
    }
    assert by_status == {("chat", "200"): 4, ("chat", "404"): 1}
    ttft = families["kvroute_ttft_seconds"].samples
    counts = [s for s in ttft if s.name == "kvroute_ttft_seconds_count"]
    assert sum(s.value for s in counts) == 3  # streams only
    assert {s.labels["cache_outcome"] for s in counts} == {"miss", "hit"}
    assert {s.labels["model"] for s in counts} == {"sim-model"}
    for labels in {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in ttft}:
        cumulative = [
            s.value
            for s in ttft
            if s.name.endswith("_bucket")
            and tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) == labels
        ]
        assert cumulative == sorted(cumulative)  # buckets never decrease
    durations = [
        s for s in families["kvroute_request_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert sum(s.value for s in durations) == 4  # streamed and whole answers
    in_flight = {
        s.labels["backend"]: s.value for s in families["kvroute_backend_in_flight"].samples
    }
    assert in_flight == {"b0": 0, "b1": 0, "b2": 0}


def test_json_metrics_keep_their_keys(router: RouterServer) -> None:
    httpx.post(f"{router.url}/v1/chat/completions", json=chat("hi", stream=True))
    body = httpx.get(f"{router.url}/metrics").json()
    assert {
        "requests",
        "errors",
        "retries",
        "client_disconnects",
        "cache_outcomes",
        "affinity",
        "ttft_ms",
        "tps",
        "tokens",
        "bytes_relayed",
        "backend_counters",
        "in_flight",
        "backends",
        "ownership",
        "policy",
    } <= set(body)
    assert body["ttft_ms"]["count"] == 1
    assert body["requests"]["streams"] == 1


def test_admission_rejections_are_counted() -> None:
    with (
        running_simulators(1, decode_tokens_per_s=40.0) as sims,
        running_router([sims[0].url], served_model="sim-model", max_in_flight=1, max_queue=0) as r,
    ):
        started = threading.Event()

        def long_stream() -> None:
            body = chat("slow", stream=True, max_tokens=40)
            with httpx.stream("POST", f"{r.url}/v1/chat/completions", json=body, timeout=30) as s:
                started.set()
                s.read()

        holder = threading.Thread(target=long_stream)
        holder.start()
        try:
            started.wait(10)
            wait_for(lambda: r.router.pool.backends[0].in_flight == 1)
            refused = httpx.post(f"{r.url}/v1/chat/completions", json=chat("second"))
            assert refused.status_code == 429
        finally:
            holder.join(30)
        families = scrape(r)
        rejected = {
            s.labels["reason"]: s.value
            for s in families["kvroute_admission_rejections"].samples
            if s.name.endswith("_total")
        }
        assert sum(rejected.values()) == 1


# --- docs/ -------------------------------------------------------------------------------
def test_grafana_dashboard_queries_only_exported_metrics(router: RouterServer) -> None:
    httpx.post(f"{router.url}/v1/chat/completions", json=chat("hi", stream=True))
    exported = exported_series(scrape(router))
    dashboard = orjson.loads((DOCS / "grafana-dashboard.json").read_bytes())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    queried = {name for expr in exprs for name in re.findall(r"\bkvroute_[a-z_]+", expr)}
    assert queried, "the dashboard queries no kvroute metric"
    assert queried <= exported, sorted(queried - exported)
    # Each panel reads the data source chosen at import.
    for panel in dashboard["panels"]:
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_prometheus_scrape_snippet() -> None:
    config = yaml.safe_load((DOCS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["kvroute"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"]
