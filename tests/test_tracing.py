"""OpenTelemetry tracing: off by default and free when off; on, a span per request with children
for admission, selection and each upstream attempt, and vLLM receives the upstream span's
`traceparent` (the simulator's /sim/stats log records what it received)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import Settings, SettingsError
from app.tracing import NO_TRACE, _exporter_for, tracing_from_settings
from tests.conftest import RouterServer, running_simulators, wait_for

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
CHAT = {
    "model": "sim-model",
    "max_tokens": 4,
    "stream": True,
    "messages": [{"role": "user", "content": "trace me"}],
}


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "enabled"),
    [
        ({}, False),
        ({"otel_traces_exporter": "otlp"}, True),
        ({"otel_traces_exporter": "console"}, True),
        ({"otel_exporter_otlp_endpoint": "http://collector:4318"}, True),
        ({"otel_exporter_otlp_traces_endpoint": "http://collector:4318/v1/traces"}, True),
        (
            {"otel_exporter_otlp_endpoint": "http://collector:4318", "otel_sdk_disabled": True},
            False,
        ),
        ({"otel_exporter_otlp_endpoint": "http://c:4318", "otel_traces_exporter": "none"}, False),
    ],
)
def test_tracing_is_switched_by_the_standard_variables(
    fields: dict[str, Any], enabled: bool
) -> None:
    assert settings(**fields).tracing_enabled is enabled


def test_otel_names_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu")
    s = settings()
    assert s.tracing_enabled
    assert s.otel_service_name == "router-eu"
    exporter, batched = _exporter_for(s)
    assert batched
    assert exporter._endpoint == "http://collector:4318/v1/traces"  # type: ignore[attr-defined]
    console, batched = _exporter_for(settings(otel_traces_exporter="console"))
    assert type(console).__name__ == "ConsoleSpanExporter"
    assert not batched


def test_off_is_a_no_op() -> None:
    tracing = tracing_from_settings(settings())
    assert not tracing.enabled
    assert tracing.start("POST", "/v1/chat/completions", {}) is NO_TRACE


def test_off_imports_nothing_of_opentelemetry() -> None:
    # FastAPI itself imports opentelemetry's API; the router adds nothing to it, and never the SDK.
    code = textwrap.dedent(
        """
        import sys
        import fastapi
        before = {m for m in sys.modules if m.startswith("opentelemetry")}
        from app.api import create_app
        from app.config import Settings
        app = create_app(Settings(_env_file=None, backend_urls=["http://127.0.0.1:9"]))
        trace = app.state.services.tracing.start("POST", "/v1/chat/completions", {})
        trace.phase("admission")
        added = {m for m in sys.modules if m.startswith("opentelemetry")} - before
        print(sorted(added))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_sdk_is_a_setting_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "opentelemetry.sdk" else real(name, *a),
    )
    with pytest.raises(SettingsError, match="--extra otel"):
        tracing_from_settings(settings(otel_traces_exporter="otlp"))


@contextmanager
def traced_router(urls: list[str]) -> Iterator[tuple[RouterServer, InMemorySpanExporter]]:
    s = settings(
        backend_urls=urls, served_model="sim-model", health_interval_s=0.2, metrics_interval_s=0.2
    )
    exporter = InMemorySpanExporter()
    server = RouterServer(s)
    server.router.tracing = tracing_from_settings(s, exporter=exporter)
    server.start()
    try:
        yield server, exporter
    finally:
        server.stop()


def spans_of(exporter: InMemorySpanExporter, count: int) -> dict[str, list[ReadableSpan]]:
    wait_for(lambda: len(exporter.get_finished_spans()) >= count, timeout_s=5)
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    return by_name


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_request_span_children_and_propagated_traceparent() -> None:
    with running_simulators(1) as sims, traced_router([sims[0].url]) as (r, exporter):
        resp = httpx.post(
            f"{r.url}/v1/chat/completions", json=CHAT, headers={"traceparent": CLIENT_TRACEPARENT}
        )
        assert resp.status_code == 200
        spans = spans_of(exporter, 4)
        log = httpx.get(f"{sims[0].url}/sim/stats").json()["log"]

    root = spans["POST /v1/chat/completions"][0]
    assert root.kind == SpanKind.SERVER
    trace_id, root_id = hex_ids(root)
    assert trace_id == CLIENT_TRACE_ID  # the client's trace goes on
    assert root.parent is not None
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN_ID
    attrs = dict(root.attributes or {})
    assert attrs["http.response.status_code"] == 200
    assert attrs["kvroute.backend"] == "b0"
    assert attrs["kvroute.cache_outcome"] == "miss"
    assert attrs["gen_ai.request.model"] == "sim-model"
    assert attrs["kvroute.request_id"] == resp.headers["x-request-id"]
    ttft_ms = attrs["kvroute.ttft_ms"]
    assert isinstance(ttft_ms, float)
    assert ttft_ms > 0
    assert attrs["gen_ai.usage.output_tokens"] == 4
    assert not any("trace me" in str(v) for v in attrs.values())  # never the prompt
    for name in ("admission", "selection", "upstream"):
        (child,) = spans[name]
        assert child.parent is not None, name
        assert f"{child.parent.span_id:016x}" == root_id, name
        assert hex_ids(child)[0] == CLIENT_TRACE_ID
        assert child.start_time is not None
        assert root.start_time is not None
        assert child.end_time is not None
        assert root.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    upstream = spans["upstream"][0]
    assert upstream.kind == SpanKind.CLIENT
    assert dict(upstream.attributes or {})["kvroute.backend"] == "b0"
    # vLLM saw the upstream span's context, not the client's.
    (entry,) = log
    version, trace_id, span_id, _flags = entry["headers"]["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", CLIENT_TRACE_ID, hex_ids(upstream)[1])
    assert spans["admission"][0].end_time <= spans["selection"][0].start_time  # type: ignore[operator]


def test_a_retry_is_a_second_upstream_span() -> None:
    with running_simulators(2) as sims, traced_router([s.url for s in sims]) as (r, exporter):
        httpx.post(f"{sims[0].url}/sim/control", json={"fail_next": 100, "status": 503})
        for i in range(8):  # different conversations: some go to b0 first and are retried
            body = {**CHAT, "messages": [{"role": "user", "content": f"conversation {i}"}]}
            assert httpx.post(f"{r.url}/v1/chat/completions", json=body).status_code == 200
        wait_for(lambda: len(exporter.get_finished_spans()) >= 8 * 4)
        received = {
            tuple(e["headers"]["traceparent"].split("-")[1:3])
            for sim in sims
            for e in httpx.get(f"{sim.url}/sim/stats").json()["log"]
        }
    upstreams: dict[int, list[ReadableSpan]] = {}
    roots = {}
    for span in exporter.get_finished_spans():
        ctx = span.get_span_context()
        assert ctx is not None
        if span.name == "upstream":
            upstreams.setdefault(ctx.trace_id, []).append(span)
        elif span.kind == SpanKind.SERVER:
            roots[ctx.trace_id] = span
    retried = [spans for spans in upstreams.values() if len(spans) == 2]
    assert retried, "no request was retried"
    for spans in retried:
        first, second = sorted(spans, key=lambda s: s.start_time or 0)
        assert first.status.status_code == StatusCode.ERROR
        assert dict(first.attributes or {})["kvroute.backend"] == "b0"
        assert second.status.status_code != StatusCode.ERROR
        assert dict(second.attributes or {})["kvroute.attempt"] == 1
        root = roots[first.get_span_context().trace_id]  # type: ignore[union-attr]
        assert dict(root.attributes or {})["kvroute.retries"] == 1
    # Each attempt carried its own span's context upstream.
    sent = {hex_ids(s) for spans in upstreams.values() for s in spans}
    assert sent == received


def test_without_tracing_the_client_traceparent_is_forwarded(router: RouterServer) -> None:
    sims_seen = httpx.post(
        f"{router.url}/v1/chat/completions", json=CHAT, headers={"traceparent": CLIENT_TRACEPARENT}
    )
    backend = int(sims_seen.headers["x-router-backend"][1:])
    assert backend >= 0
    url = router.settings.backend_urls[backend]
    (entry,) = httpx.get(f"{url}/sim/stats").json()["log"]
    assert entry["headers"]["traceparent"] == CLIENT_TRACEPARENT
