"""Logging: the process-wide format (`LOG_FORMAT`: text or JSON) and one line per request.

`RequestLog.emit(rec)` logs a finished request on the `kvroute.request` logger with its fields in
`extra`; the formatter decides how they look, and does so only when the line is written. The
fields are identifiers and figures, never the prompt, the completion or a header's value other
than the request id: `request_fields` is the whole list.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import orjson

from app.metrics import RequestRecord

LogFormat = Literal["text", "json"]
REQUEST_LOGGER = "kvroute.request"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS_ATTR = "kvroute_fields"
# Characters that make a key=value value ambiguous; such values are written as JSON strings.
_QUOTE_IF = frozenset(' "=\\\n\r\t')


def request_fields(rec: RequestRecord) -> dict[str, Any]:
    """The fields of a request's log line, in order, without the empty ones."""
    scope = rec.scope
    fields: dict[str, Any] = {
        "request_id": scope.request_id if scope is not None else None,
        "tenant": scope.tenant if scope is not None else None,
        "model": scope.model if scope is not None else None,
        "endpoint": rec.endpoint,
        "backend": rec.backend,
        "cache_outcome": rec.outcome,
        "affinity": rec.affinity,
        "status": rec.status,
        "ttft_ms": round(rec.ttft_ms, 3) if rec.ttft_ms is not None else None,
        "prompt_tokens": rec.prompt_tokens or None,
        "completion_tokens": rec.completion_tokens or None,
        "cached_tokens": rec.cached_tokens if rec.prompt_tokens else None,
        "retries": rec.retries or None,
        "error": rec.error_kind,
        "stream": rec.stream or None,
        "duration_ms": round(rec.duration_s * 1000, 3) if rec.duration_s is not None else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def render_kv(fields: dict[str, Any]) -> str:
    """`key=value` pairs; a value with spaces, quotes or line breaks is written as a JSON string,
    so a client-chosen value (a request id) cannot forge another field or another line."""
    parts = []
    for key, value in fields.items():
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        if isinstance(value, str) and (not value or any(c in _QUOTE_IF for c in value)):
            text = orjson.dumps(value).decode()
        parts.append(f"{key}={text}")
    return " ".join(parts)


class KeyValueFormatter(logging.Formatter):
    """The readable format; a request line's fields follow its message as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, _FIELDS_ATTR, None)
        return f"{line} {render_kv(fields)}" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then a request line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_time(record.created),
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


def _iso_time(created: float) -> str:
    whole = int(created)
    millis = int((created - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


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
        self.logger.log(level, "request", extra={_FIELDS_ATTR: request_fields(rec)})
