"""One log line per request, text or JSON: its fields, its quoting, and no secret in any line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from app.config import Settings, SettingsError, load_settings
from app.logs import (
    REQUEST_LOGGER,
    JsonFormatter,
    KeyValueFormatter,
    RequestLog,
    configure_logging,
    render_kv,
    request_fields,
)
from app.metrics import RequestRecord, RequestScope
from tests.conftest import running_router, running_simulators

SECRET_PROMPT = "my password is hunter2-sk-live-51HxSECRETPROMPT"
CLIENT_KEY = "sk-client-SECRETCLIENTKEY123"
BACKEND_KEY = "sk-backend-SECRETBACKENDKEY456"


def finished(**overrides: Any) -> RequestRecord:
    scope = RequestScope("req-1", started_s=0.0, tenant="acme", model="m")
    fields: dict[str, Any] = {
        "endpoint": "chat",
        "status": 200,
        "backend": "b1",
        "outcome": "hit",
        "affinity": "conversation",
        "ttft_ms": 7.12345,
        "prompt_tokens": 30,
        "completion_tokens": 8,
        "cached_tokens": 16,
        "stream": True,
        "scope": scope,
        "duration_s": 0.04,
        **overrides,
    }
    return RequestRecord(**fields)


class Capture(logging.Handler):
    """Every formatted line of the loggers it is attached to."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[tuple[Capture, Capture]]:
    """JSON and text captures on the root logger (every logger of the process writes there)."""
    root = logging.getLogger()
    as_json, as_text = Capture(JsonFormatter()), Capture(KeyValueFormatter())
    level = root.level
    root.addHandler(as_json)
    root.addHandler(as_text)
    root.setLevel(logging.DEBUG)
    try:
        yield as_json, as_text
    finally:
        root.removeHandler(as_json)
        root.removeHandler(as_text)
        root.setLevel(level)


# --- pure --------------------------------------------------------------------------------
def test_request_fields_in_order_without_empty_ones() -> None:
    fields = request_fields(finished())
    assert list(fields) == [
        "request_id",
        "tenant",
        "model",
        "endpoint",
        "backend",
        "cache_outcome",
        "affinity",
        "status",
        "ttft_ms",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "stream",
        "duration_ms",
    ]
    assert fields["ttft_ms"] == 7.123
    assert fields["duration_ms"] == 40.0
    refused = request_fields(RequestRecord(endpoint="chat", status=429, error_kind="Overloaded"))
    assert refused == {"endpoint": "chat", "status": 429, "error": "Overloaded"}


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain-id", "k=plain-id"),
        ("two words", 'k="two words"'),
        ('a"quote', 'k="a\\"quote"'),
        ("line\nstatus=200 forged=1", 'k="line\\nstatus=200 forged=1"'),
        ("", 'k=""'),
        (12.5, "k=12.5"),
        (True, "k=true"),
    ],
)
def test_key_value_quoting(value: object, rendered: str) -> None:
    assert render_kv({"k": value}) == rendered


def test_formatters_render_one_line_each() -> None:
    logger = logging.getLogger("kvroute.test-formatters")
    logger.propagate = False
    as_json, as_text = Capture(JsonFormatter()), Capture(KeyValueFormatter())
    logger.addHandler(as_json)
    logger.addHandler(as_text)
    logger.setLevel(logging.INFO)
    RequestLog(logger).emit(finished(scope=RequestScope("id with\nnewline", 0.0)))
    RequestLog(logger).emit(finished(status=502, error_kind="UpstreamBroken"))
    logger.info("plain %s", "message")
    assert all("\n" not in line for line in as_json.lines + as_text.lines)
    first, failed, plain = (orjson.loads(line) for line in as_json.lines)
    assert first["msg"] == "request"
    assert first["request_id"] == "id with\nnewline"
    assert first["level"] == "info"
    assert first["ts"].endswith("Z")
    assert first["status"] == 200
    assert failed["level"] == "warning"
    assert failed["error"] == "UpstreamBroken"
    assert plain == {k: plain[k] for k in ("ts", "level", "logger", "msg")}
    assert plain["msg"] == "plain message"
    assert 'request_id="id with\\nnewline"' in as_text.lines[0]
    assert " INFO kvroute.test-formatters: request " in as_text.lines[0]
    assert "cache_outcome=hit" in as_text.lines[0]
    assert "ttft_ms=7.123" in as_text.lines[0]


def test_nothing_is_formatted_when_the_level_is_off() -> None:
    logger = logging.getLogger("kvroute.test-off")
    logger.propagate = False
    capture = Capture(JsonFormatter())
    logger.addHandler(capture)
    logger.setLevel(logging.WARNING)
    RequestLog(logger).emit(finished())
    assert capture.lines == []


def test_log_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).log_format == "text"  # type: ignore[call-arg]
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert load_settings(_env_file=None).log_format == "json"
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(SettingsError, match=r"^invalid setting LOG_FORMAT:"):
        load_settings(_env_file=None)


def test_configure_logging_installs_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging("info", "json")
        logging.getLogger("kvroute.test-configure").info("hello")
        RequestLog().emit(finished())
        lines = capsys.readouterr().err.strip().splitlines()
        decoded = [orjson.loads(line) for line in lines]
        assert decoded[0]["msg"] == "hello"
        assert decoded[1]["logger"] == REQUEST_LOGGER
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


# --- end to end ----------------------------------------------------------------------------
def test_one_line_per_request_and_no_secret(captured: tuple[Capture, Capture]) -> None:
    as_json, as_text = captured
    secret_chat = {
        "model": "sim-model",
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": f"system secret {SECRET_PROMPT}"},
            {"role": "user", "content": SECRET_PROMPT},
        ],
    }
    with (
        running_simulators(2) as sims,
        running_router(
            [s.url for s in sims], served_model="sim-model", backend_api_key=BACKEND_KEY
        ) as r,
    ):
        auth = {"Authorization": f"Bearer {CLIENT_KEY}", "X-Tenant-ID": "acme"}
        streamed = httpx.post(
            f"{r.url}/v1/chat/completions",
            json={**secret_chat, "stream": True},
            headers={**auth, "X-Request-Id": "req-stream-1"},
        )
        whole = httpx.post(
            f"{r.url}/v1/chat/completions",
            json=secret_chat,
            headers={**auth, "X-Request-Id": "req-whole-1"},
        )
        bad = httpx.post(
            f"{r.url}/v1/chat/completions",
            content=b'{"messages": "' + SECRET_PROMPT.encode() + b'"}',
            headers={**auth, "Content-Type": "application/json", "X-Request-Id": "req-bad-1"},
        )
        generated = httpx.post(f"{r.url}/v1/chat/completions", json=secret_chat)
        assert (streamed.status_code, whole.status_code, bad.status_code) == (200, 200, 400)
        # The request id is echoed to the client and sent on to vLLM.
        assert streamed.headers["x-request-id"] == "req-stream-1"
        assert whole.headers["x-request-id"] == "req-whole-1"
        assert bad.headers["x-request-id"] == "req-bad-1"
        generated_id = generated.headers["x-request-id"]
        assert len(generated_id) == 32
        upstream_ids = {
            entry["headers"].get("x-request-id")
            for sim in sims
            for entry in httpx.get(f"{sim.url}/sim/stats").json()["log"]
        }
        assert {"req-stream-1", "req-whole-1", generated_id} <= upstream_ids

    request_lines = [
        orjson.loads(line)
        for line in as_json.lines
        if orjson.loads(line)["logger"] == REQUEST_LOGGER
    ]
    by_id = {line["request_id"]: line for line in request_lines}
    assert len(request_lines) == 4
    assert len(by_id) == 4  # one line per request
    stream_line = by_id["req-stream-1"]
    assert stream_line["tenant"] == "acme"
    assert stream_line["model"] == "sim-model"
    assert stream_line["backend"] in {"b0", "b1"}
    assert stream_line["cache_outcome"] == "miss"
    assert stream_line["status"] == 200
    assert stream_line["stream"] is True
    assert stream_line["ttft_ms"] > 0
    assert stream_line["completion_tokens"] == 4
    assert stream_line["prompt_tokens"] > 0
    assert stream_line["duration_ms"] >= stream_line["ttft_ms"]
    whole_line = by_id["req-whole-1"]
    assert whole_line["cache_outcome"] == "hit"
    assert whole_line["backend"] == stream_line["backend"]
    assert "ttft_ms" not in whole_line
    assert whole_line["completion_tokens"] == 4
    assert by_id["req-bad-1"]["status"] == 400
    assert by_id["req-bad-1"]["error"] == "BadRequest"
    text_lines = [line for line in as_text.lines if f" {REQUEST_LOGGER}: request " in line]
    assert len(text_lines) == 4
    assert any("request_id=req-stream-1 tenant=acme model=sim-model" in line for line in text_lines)
    for line in as_json.lines + as_text.lines:
        for secret in (SECRET_PROMPT, "hunter2", CLIENT_KEY, BACKEND_KEY, "SECRET"):
            assert secret not in line, line
