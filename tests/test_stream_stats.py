from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.config import Settings
from app.stream_stats import (
    StreamScanner,
    figures,
    read_stats,
    render_stats_event,
    stats_format,
)

ROLE = b'data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,"total_tokens":42,"prompt_tokens_details":{"cached_tokens":32}}}\n\n'
DONE = b"data: [DONE]\n\n"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.01
        return self.t


def test_relays_events_untouched_and_strips_injected_usage() -> None:
    scanner = StreamScanner(strip_usage=True, start_s=0.0, clock=Clock())
    out = b"".join(scanner.feed(e) for e in (ROLE, TOKEN, TOKEN, USAGE, DONE))
    assert out == ROLE + TOKEN + TOKEN
    assert scanner.done
    assert scanner.usage is not None
    assert scanner.usage["prompt_tokens"] == 40
    assert scanner.meta == {
        "id": "c1",
        "created": 7,
        "model": "m",
        "object": "chat.completion.chunk",
    }


def test_keeps_usage_when_the_client_asked() -> None:
    scanner = StreamScanner(strip_usage=False, start_s=0.0)
    out = scanner.feed(ROLE + TOKEN + USAGE + DONE)
    assert out == ROLE + TOKEN + USAGE


def test_events_split_across_chunks_at_any_byte() -> None:
    stream = ROLE + TOKEN + TOKEN + USAGE + DONE
    for cut in range(1, len(stream)):
        scanner = StreamScanner(strip_usage=True, start_s=0.0)
        out = scanner.feed(stream[:cut]) + scanner.feed(stream[cut:]) + scanner.flush()
        assert out == ROLE + TOKEN + TOKEN, cut
        assert scanner.done


def test_ttft_is_the_first_content_not_the_role_chunk() -> None:
    clock = Clock()
    scanner = StreamScanner(strip_usage=True, start_s=0.0, clock=clock)
    scanner.feed(ROLE)
    assert scanner.first_content_s is None
    scanner.feed(TOKEN)
    assert scanner.first_content_s == clock.t
    scanner.feed(TOKEN)
    fig = figures(scanner, estimated_prompt_tokens=10, estimated_cached_tokens=5)
    assert fig.token_source == "estimate"
    assert fig.completion_tokens == 2
    assert fig.prompt_tokens == 10
    assert fig.cached_tokens == 5
    assert fig.novel_tokens == 5


def test_exact_figures_from_usage() -> None:
    scanner = StreamScanner(strip_usage=True, start_s=0.0, clock=Clock())
    scanner.feed(ROLE + TOKEN + TOKEN + USAGE + DONE)
    fig = figures(scanner, estimated_prompt_tokens=999, estimated_cached_tokens=999)
    assert (fig.prompt_tokens, fig.completion_tokens, fig.cached_tokens, fig.novel_tokens) == (
        40,
        2,
        32,
        8,
    )
    assert fig.token_source == "backend"
    assert fig.ttft_ms is not None
    assert fig.ttft_ms > 0


def test_error_event_is_forwarded_and_recorded() -> None:
    err = b'data: {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}\n\n'
    scanner = StreamScanner(strip_usage=True, start_s=0.0)
    assert scanner.feed(err + DONE) == err
    assert scanner.error is not None
    assert scanner.error["message"] == "boom"


def test_completion_text_counts_as_content() -> None:
    chunk = b'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a"}]}\n\n'
    scanner = StreamScanner(strip_usage=True, start_s=0.0)
    scanner.feed(chunk)
    assert scanner.first_content_s is not None


META = {"id": "c1", "created": 7, "model": "m", "object": None}


def test_stats_chunk_is_a_plain_data_chunk_with_no_choices() -> None:
    event = render_stats_event(META, "chat.completion.chunk", {"backend": "b0"})
    # One `data:` line and a blank line: what a reader that strips `data: ` can json-decode.
    assert event.startswith(b"data: {")
    assert event.endswith(b"}\n\n")
    assert event.count(b"\n") == 2
    body = orjson.loads(event.removeprefix(b"data: "))
    assert body == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [],
        "kvroute_event": "router.stream_stats",
        "router_stats": {"backend": "b0"},
    }


def test_stats_event_form_names_the_event_and_carries_the_same_data() -> None:
    chunk = render_stats_event(META, "text_completion", {"backend": "b1"}, "chunk")
    event = render_stats_event(META, "text_completion", {"backend": "b1"}, "event")
    assert event == b"event: router.stream_stats\n" + chunk
    assert read_stats(event) == read_stats(chunk) == {"backend": "b1"}


@pytest.mark.parametrize(
    "event",
    [
        TOKEN,
        USAGE,
        DONE,
        # content that merely mentions the name is not the stats chunk
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"kvroute_event"}}]}\n\n',
        b'data: {"kvroute_event":"other","router_stats":{}}\n\n',
        b'data: {"kvroute_event":"router.stream_stats","router_stats":[1]}\n\n',
        b"data: {not json kvroute_event\n\n",
    ],
)
def test_read_stats_ignores_everything_else(event: bytes) -> None:
    assert read_stats(event) is None


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("header", "configured", "expected"),
    [
        (None, "chunk", "chunk"),
        (None, "event", "event"),
        ("", "event", "event"),
        ("1", "chunk", "chunk"),
        (" TRUE ", "event", "event"),
        ("on", "event", "event"),
        ("yes", "event", "event"),
        ("whatever", "event", "event"),  # unknown values mean the configured form
        ("0", "chunk", "none"),
        ("false", "event", "none"),
        ("Off", "chunk", "none"),
        ("no", "chunk", "none"),
        ("chunk", "event", "chunk"),
        ("EVENT", "chunk", "event"),
    ],
)
def test_stats_format_from_header_and_setting(
    header: str | None, configured: str, expected: str
) -> None:
    assert stats_format(header, settings(stream_stats_format=configured)) == expected


@pytest.mark.parametrize("header", [None, "1", "chunk", "event"])
def test_stream_stats_false_wins_over_any_header(header: str | None) -> None:
    assert stats_format(header, settings(stream_stats=False)) == "none"


FINISH = b'data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length"}]}\n\n'
USAGE_FP = USAGE.replace(b"}}}\n\n", b'}},"system_fingerprint":"vllm-0.32.0-abc"}\n\n')


def test_stripped_usage_gives_its_fingerprint_back_to_the_finishing_chunk() -> None:
    # vLLM moves system_fingerprint onto the usage chunk when usage is asked for.
    scanner = StreamScanner(strip_usage=True, start_s=0.0, clock=Clock())
    out = b"".join(scanner.feed(e) for e in (ROLE, TOKEN, FINISH, USAGE_FP, DONE)) + scanner.flush()
    finishing = orjson.loads(out.split(b"\n\n")[2].removeprefix(b"data: "))
    assert finishing["system_fingerprint"] == "vllm-0.32.0-abc"
    assert finishing["choices"][0]["finish_reason"] == "length"
    assert b'"usage"' not in out
    assert out.count(b"\n\n") == 3


def test_finishing_chunk_is_not_held_when_usage_is_kept_or_absent() -> None:
    kept = StreamScanner(strip_usage=False, start_s=0.0)
    assert kept.feed(FINISH) == FINISH
    plain = StreamScanner(strip_usage=True, start_s=0.0)
    assert plain.feed(FINISH) == b""
    assert plain.feed(DONE) == FINISH  # no usage came: released unchanged
    cut = StreamScanner(strip_usage=True, start_s=0.0)
    cut.feed(FINISH)
    assert cut.flush() == FINISH  # upstream ended: nothing is lost
