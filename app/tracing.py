"""Optional OpenTelemetry tracing: one span per request, with children for admission, selection
and each upstream attempt, whose context goes to vLLM as the W3C `traceparent`.

Off unless the standard `OTEL_*` settings ask for it (see `Settings.tracing_enabled`). Off, this
module imports nothing of opentelemetry and a request pays a handful of no-op calls on `NO_TRACE`.
The SDK is the optional extra `kvroute[otel]`; it is imported only when tracing is on. Spans go to
a provider of the router's own (not the global one), so nothing else in the process starts
tracing because of it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from app.config import Settings, SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from app.metrics import RequestRecord


class RequestTrace(Protocol):
    """The trace of one request. Phases follow each other; each call ends the one before."""

    def phase(self, name: str) -> None:
        """Start a child span `name` (e.g. "admission", "selection")."""

    def upstream(self, backend: str, attempt: int, headers: MutableMapping[str, str]) -> None:
        """Start the span of an upstream attempt and write its context into `headers`."""

    def end(self, rec: RequestRecord) -> None:
        """The request is over: close its spans with what `rec` says."""


class _NoTrace:
    __slots__ = ()

    def phase(self, name: str) -> None:
        pass

    def upstream(self, backend: str, attempt: int, headers: MutableMapping[str, str]) -> None:
        pass

    def end(self, rec: RequestRecord) -> None:
        pass


NO_TRACE: RequestTrace = _NoTrace()


class Tracing:
    """Tracing switched off: every request gets `NO_TRACE`."""

    enabled = False

    def start(self, method: str, path: str, headers: Mapping[str, str]) -> RequestTrace:
        return NO_TRACE

    def shutdown(self) -> None:
        pass


def tracing_from_settings(settings: Settings, exporter: SpanExporter | None = None) -> Tracing:
    """`Tracing` for these settings; `exporter` (tests: an in-memory one) turns it on regardless."""
    if exporter is None and not settings.tracing_enabled:
        return Tracing()
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise SettingsError(
            "tracing is on (OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT) but the "
            "OpenTelemetry SDK is missing: install the extra, e.g. `uv sync --extra otel`"
        )
    return _OtelTracing(settings, exporter)


def _exporter_for(settings: Settings) -> tuple[SpanExporter, bool]:
    """The exporter the settings name, and whether it should be fed in batches."""
    if settings.otel_traces_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = settings.otel_exporter_otlp_traces_endpoint or None
    if endpoint is None and settings.otel_exporter_otlp_endpoint:
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint), True


class _OtelTracing(Tracing):
    enabled = True

    def __init__(self, settings: Settings, exporter: SpanExporter | None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        batch = False
        if exporter is None:
            exporter, batch = _exporter_for(settings)
        resource = Resource.create({"service.name": settings.otel_service_name})
        self.provider: TracerProvider = TracerProvider(resource=resource)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("kvroute")
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = trace.set_span_in_context
        self.kinds = trace.SpanKind
        self.status_error = trace.Status(trace.StatusCode.ERROR)

    def start(self, method: str, path: str, headers: Mapping[str, str]) -> RequestTrace:
        parent = self.propagator.extract(headers)
        root = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=self.kinds.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        return _OtelTrace(self, root)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _OtelTrace:
    __slots__ = ("child", "in_upstream", "owner", "root")

    def __init__(self, owner: _OtelTracing, root: Span) -> None:
        self.owner = owner
        self.root = root
        self.child: Span | None = None
        self.in_upstream = False  # whether `child` is an upstream attempt

    def _open(self, name: str, upstream: bool = False, **kwargs: Any) -> Span:
        if self.child is not None:
            if self.in_upstream:
                # A new attempt means the one before failed before its first byte.
                self.child.set_status(self.owner.status_error)
            self.child.end()
        self.child = self.owner.tracer.start_span(
            name, context=self.owner.in_context(self.root), **kwargs
        )
        self.in_upstream = upstream
        return self.child

    def phase(self, name: str) -> None:
        self._open(name)

    def upstream(self, backend: str, attempt: int, headers: MutableMapping[str, str]) -> None:
        span = self._open(
            "upstream",
            upstream=True,
            kind=self.owner.kinds.CLIENT,
            attributes={"kvroute.backend": backend, "kvroute.attempt": attempt},
        )
        self.owner.propagator.inject(headers, context=self.owner.in_context(span))

    def end(self, rec: RequestRecord) -> None:
        root = self.root
        attributes: dict[str, str | int | float] = {
            "http.response.status_code": rec.status,
            "kvroute.endpoint": rec.endpoint,
        }
        scope = rec.scope
        if scope is not None:
            attributes["kvroute.request_id"] = scope.request_id
            if scope.model:
                attributes["gen_ai.request.model"] = scope.model
        for key, value in (
            ("kvroute.backend", rec.backend),
            ("kvroute.cache_outcome", rec.outcome),
            ("kvroute.affinity", rec.affinity),
            ("kvroute.ttft_ms", rec.ttft_ms),
            ("error.type", rec.error_kind),
        ):
            if value is not None:
                attributes[key] = value
        if rec.prompt_tokens or rec.completion_tokens:
            attributes["gen_ai.usage.input_tokens"] = rec.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = rec.completion_tokens
            attributes["kvroute.cached_tokens"] = rec.cached_tokens
        if rec.retries:
            attributes["kvroute.retries"] = rec.retries
        root.set_attributes(attributes)
        child = self.child
        if child is not None:
            if self.in_upstream:
                child.set_attribute("http.response.status_code", rec.status)
            if rec.error_kind is not None or rec.status >= 500:
                child.set_status(self.owner.status_error)
            child.end()
            self.child = None
        if rec.status >= 500:
            root.set_status(self.owner.status_error)
        root.end()
