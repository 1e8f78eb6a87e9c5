"""What observability costs a request: metrics, the request log line, tracing off and on.

`uv run python -m bench.observability [--n 20000]` times, per finished request, in this process:
`RouterMetrics.record` (counters, three fixed-bucket histograms, the decisions ring) against the
counters alone; the same histograms done with prometheus_client objects; `RequestLog.emit` with
the level off, as text and as JSON (to a null stream, so formatting is counted, not the disk);
the trace calls with tracing off (`NO_TRACE`) and on (SDK spans, an exporter that drops them);
and one Prometheus scrape. Prints a table and writes bench/results/observability.json.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.config import Settings
from app.logs import JsonFormatter, KeyValueFormatter, RequestLog
from app.metrics import RequestRecord, RequestScope, RouterMetrics
from app.tracing import tracing_from_settings
from bench.report import write_json

DEFAULT_JSON = "bench/results/observability.json"
BACKENDS = ("b0", "b1", "b2", "b3")
OUTCOMES = ("hit", "miss", "spill", "reassigned")


def finished(i: int) -> RequestRecord:
    return RequestRecord(
        endpoint="chat",
        status=200,
        backend=BACKENDS[i % 4],
        outcome=OUTCOMES[i % 4],
        affinity="conversation",
        ttft_ms=5.0 + i % 200,
        tps=80.0 + i % 50,
        prompt_tokens=800,
        completion_tokens=128,
        cached_tokens=512,
        bytes_out=4096,
        stream=True,
        scope=RequestScope(f"req-{i}", time.monotonic(), tenant=f"tenant-{i % 50}", model="m"),
    )


def per_call_us(fn: Callable[[int], object], n: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of `n` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def _prometheus_client_objects() -> Callable[[RequestRecord], None]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    labels = ["backend", "model", "cache_outcome"]
    ttft = Histogram("t_ttft_seconds", "", labels, registry=registry)
    tpot = Histogram("t_tpot_seconds", "", labels, registry=registry)
    duration = Histogram("t_duration_seconds", "", labels, registry=registry)
    requests = Counter("t_requests", "", ["endpoint", "status"], registry=registry)

    def observe(rec: RequestRecord) -> None:
        values = (rec.backend or "", "m", rec.outcome or "")
        requests.labels(rec.endpoint, str(rec.status)).inc()
        ttft.labels(*values).observe((rec.ttft_ms or 0) / 1000)
        tpot.labels(*values).observe(1 / (rec.tps or 1))
        duration.labels(*values).observe(0.2)

    return observe


class _DropSpans:
    """A span exporter that keeps nothing (the SDK's own cost, without an exporter's)."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def _trace_calls(enabled: bool) -> Callable[[int], object]:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    tracing = tracing_from_settings(settings, _DropSpans() if enabled else None)  # type: ignore[arg-type]
    headers: dict[str, str] = {}
    rec = finished(0)

    def one(i: int) -> None:
        trace = tracing.start("POST", "/v1/chat/completions", headers)
        trace.phase("admission")
        trace.phase("selection")
        trace.upstream("b0", 0, {})
        trace.end(rec)

    return one


def measure(n: int) -> dict[str, Any]:
    records = [finished(i) for i in range(n)]
    results: dict[str, float] = {}

    m = RouterMetrics()
    results["metrics.record (all)"] = per_call_us(lambda i: m.record(records[i]), n)
    counters = RouterMetrics()
    results["metrics: counters alone (before)"] = per_call_us(
        lambda i: counters._count(records[i]), n
    )
    observe = _prometheus_client_objects()
    results["prometheus_client objects instead"] = per_call_us(lambda i: observe(records[i]), n)

    for name, formatter, level in (
        ("log line, level off", KeyValueFormatter(), logging.WARNING),
        ("log line, text", KeyValueFormatter(), logging.INFO),
        ("log line, json", JsonFormatter(), logging.INFO),
    ):
        logger = logging.getLogger(f"bench.observability.{name}")
        logger.propagate = False
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(formatter)
        logger.handlers = [handler]
        logger.setLevel(level)
        log = RequestLog(logger)
        results[name] = per_call_us(lambda i, log=log: log.emit(records[i]), n)  # type: ignore[misc]
        handler.stream = io.StringIO()

    results["trace, off"] = per_call_us(_trace_calls(False), n)
    results["trace, on (4 spans)"] = per_call_us(_trace_calls(True), max(n // 10, 100))

    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry()
    registry.register(
        m.collector(lambda: {"backend_in_flight": dict.fromkeys(BACKENDS, 1.0)}, dict)
    )
    start = time.perf_counter()
    text = generate_latest(registry)
    scrape_ms = (time.perf_counter() - start) * 1000
    return {
        "per_request_us": {k: round(v, 2) for k, v in results.items()},
        "scrape_ms": round(scrape_ms, 2),
        "scrape_bytes": len(text),
        "label_sets": len(m.ttft_s.series),
        "n": n,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20000, help="calls per measurement")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args(argv)
    result = measure(args.n)
    width = max(len(k) for k in result["per_request_us"])
    print(f"{'per finished request':<{width}}  µs")
    for name, us in result["per_request_us"].items():
        print(f"{name:<{width}}  {us:7.2f}")
    print(
        f"\none scrape: {result['scrape_ms']} ms, {result['scrape_bytes']} bytes, "
        f"{result['label_sets']} histogram label sets"
    )
    path = Path(args.json)
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
