"""Logging: the process-wide format (`LOG_FORMAT`: text or JSON) and one line per request.

`RequestLog.emit(rec)` logs a finished request on the `kvroute.request` logger with its fields in
`extra`; the formatter decides how they look, and does so only when the line is written. The
fields are identifiers and figures, never the prompt, the completion or a header's value other
than the request id: `request_fields` is the whole list.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import orjson

from app.metrics import RequestRecord

LogFormat = Literal["text", "json"]
REQUEST_LOGGER = "kvroute.request"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS_ATTR = "kvroute_fields"
# Characters that make a key=value value ambiguous; such values are written as JSON strings.
_QUOTE = re.compile(r'[\s"=\\\x00-\x1f\x7f]')


def request_fields(rec: RequestRecord) -> dict[str, Any]:
    """The fields of a request's log line, in order, without the empty ones."""
    fields: dict[str, Any] = {}
    scope = rec.scope
    if scope is not None:
        fields["request_id"] = scope.request_id
        if scope.tenant is not None:
            fields["tenant"] = scope.tenant
        if scope.model is not None:
            fields["model"] = scope.model
    fields["endpoint"] = rec.endpoint
    if rec.backend is not None:
        fields["backend"] = rec.backend
    if rec.outcome is not None:
        fields["cache_outcome"] = rec.outcome
    if rec.affinity is not None:
        fields["affinity"] = rec.affinity
    fields["status"] = rec.status
    if rec.ttft_ms is not None:
        fields["ttft_ms"] = round(rec.ttft_ms, 3)
    if rec.prompt_tokens:
        fields["prompt_tokens"] = rec.prompt_tokens
    if rec.completion_tokens:
        fields["completion_tokens"] = rec.completion_tokens
    if rec.prompt_tokens:
        fields["cached_tokens"] = rec.cached_tokens
    if rec.retries:
        fields["retries"] = rec.retries
    if rec.error_kind is not None:
        fields["error"] = rec.error_kind
    if rec.stream:
        fields["stream"] = True
    if rec.duration_s is not None:
        fields["duration_ms"] = round(rec.duration_s * 1000, 3)
    return fields


def render_kv(fields: dict[str, Any]) -> str:
    """`key=value` pairs; a value with spaces, quotes or line breaks is written as a JSON string,
    so a client-chosen value (a request id) cannot forge another field or another line."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, str):
            text = orjson.dumps(value).decode() if not value or _QUOTE.search(value) else value
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = orjson.dumps(value, default=str).decode()
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _SecondCache:
    """The formatted wall-clock second, made once a second rather than once a line."""

    __slots__ = ("_second", "_text", "_to_text")

    def __init__(self, to_text: Callable[[int], str]) -> None:
        self._second = -1
        self._text = ""
        self._to_text = to_text

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, self._to_text(second)
        return self._text


class KeyValueFormatter(logging.Formatter):
    """The readable format (`TEXT_FORMAT`); a request line's fields follow its message as
    key=value. Formats directly rather than through %-style templates: it runs for every request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._local_second = _SecondCache(
            lambda s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s))
        )

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self._local_second(record.created)},{int(record.msecs):03d} "
            f"{record.levelname} {record.name}: {record.getMessage()}"
        )
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            line = f"{line} {render_kv(fields)}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then a request line's fields."""

    def __init__(self) -> None:
        super().__init__()
        self._utc_second = _SecondCache(
            lambda s: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
        )

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self._utc_second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else KeyValueFormatter()


def configure_logging(level: str, log_format: LogFormat) -> None:
    """The root handler (stderr) in the chosen format; loggers without handlers of their own
    (kvroute's, and uvicorn's when it is started with `log_config=None`) write through it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RequestLog:
    """One line per finished request: INFO, WARNING for a 5xx."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(REQUEST_LOGGER)

    def emit(self, rec: RequestRecord) -> None:
        level = logging.WARNING if rec.status >= 500 else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        # makeRecord + handle: what `logger.log` does, without its walk up the stack for the
        # caller's file and line (a request line has no interesting caller).
        logger = self.logger
        record = logger.makeRecord(
            logger.name,
            level,
            "",
            0,
            "request",
            (),
            None,
            extra={_FIELDS_ATTR: request_fields(rec)},
        )
        logger.handle(record)
