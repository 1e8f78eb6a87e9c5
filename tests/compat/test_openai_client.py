"""The official `openai` client, sync and async: chat and completions, streamed and not, the
same answer straight from a backend and through kvroute; the router's figures in `model_extra`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import openai
import pytest

from tests.compat.conftest import MODEL, ONE_LOOP, Pair, Target

Kind = Literal["chat", "completions"]
MAX_TOKENS = 6
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
PROMPT = "The three primary colours are"
# (stream, include_usage): the router hides the usage chunk it asks vLLM for unless the client
# asked for it too, so both stream variants are compared.
MODES = [(False, False), (True, False), (True, True)]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a client sees, in comparable form; `stats` are the router's figures (streams)."""

    pieces: tuple[str, ...]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ids: frozenset[str]
    stats: tuple[dict[str, Any], ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def comparable(self) -> Answer:
        """Without what differs by nature between two servers' answers (ids, router figures)."""
        return replace(self, ids=frozenset(), stats=())


def request(kind: Kind, stream: bool, include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS}
    body.update({"messages": MESSAGES} if kind == "chat" else {"prompt": PROMPT})
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def from_whole(kind: Kind, response: Any) -> Answer:
    choice = response.choices[0]
    text = choice.message.content if kind == "chat" else choice.text
    return Answer(
        pieces=(text,),
        finish_reason=choice.finish_reason,
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        ids=frozenset({response.id}),
    )


def from_chunks(kind: Kind, chunks: list[Any]) -> Answer:
    pieces: list[str] = []
    finish = None
    usage = None
    stats = []
    for chunk in chunks:
        extra = chunk.model_extra or {}
        if extra.get("kvroute_event") == "router.stream_stats":
            assert not chunk.choices
            assert chunk.usage is None
            stats.append(extra["router_stats"])
            continue
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if kind == "chat" else choice.text
            if piece:
                pieces.append(piece)
            finish = choice.finish_reason or finish
    return Answer(
        pieces=tuple(pieces),
        finish_reason=finish,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        ids=frozenset(chunk.id for chunk in chunks),
        stats=tuple(stats),
    )


def ask_sync(target: Target, kind: Kind, stream: bool, include_usage: bool) -> Answer:
    with openai.OpenAI(base_url=target.base_url, api_key="unused", max_retries=0) as client:
        create: Any = (
            client.chat.completions.create if kind == "chat" else client.completions.create
        )
        response = create(**request(kind, stream, include_usage))
        return from_chunks(kind, list(response)) if stream else from_whole(kind, response)


async def ask_async(target: Target, kind: Kind, stream: bool, include_usage: bool) -> Answer:
    async with openai.AsyncOpenAI(
        base_url=target.base_url, api_key="unused", max_retries=0
    ) as client:
        create: Any = (
            client.chat.completions.create if kind == "chat" else client.completions.create
        )
        response = await create(**request(kind, stream, include_usage))
        if stream:
            return from_chunks(kind, [chunk async for chunk in response])
        return from_whole(kind, response)


def check(kind: Kind, stream: bool, include_usage: bool, direct: Answer, routed: Answer) -> None:
    assert routed.comparable() == direct.comparable()
    assert routed.text == "".join(f"tok{i} " for i in range(MAX_TOKENS))
    assert routed.finish_reason == "length"
    if not stream or include_usage:
        assert routed.completion_tokens == MAX_TOKENS
        assert routed.prompt_tokens
    else:
        assert routed.prompt_tokens is None  # the usage chunk the router asked for is hidden
    assert direct.stats == ()
    if not stream:
        assert routed.stats == ()
        return
    # One stats chunk, part of the same stream (same id), its figures those of the answer.
    assert len(routed.stats) == 1
    assert len(routed.ids) == 1
    stats = routed.stats[0]
    assert stats["completion_tokens"] == MAX_TOKENS
    assert stats["token_source"] == "backend"
    if include_usage:
        assert stats["prompt_tokens"] == routed.prompt_tokens
    assert stats["backend"] in {"b0", "b1"}
    assert stats["ttft_ms"] > 0


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize(("stream", "include_usage"), MODES)
def test_sync_client_gets_the_backends_answer(
    pair: Pair, kind: Kind, stream: bool, include_usage: bool
) -> None:
    direct = ask_sync(pair.direct, kind, stream, include_usage)
    routed = ask_sync(pair.router, kind, stream, include_usage)
    check(kind, stream, include_usage, direct, routed)


@ONE_LOOP
@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize(("stream", "include_usage"), MODES)
async def test_async_client_gets_the_backends_answer(
    pair: Pair, kind: Kind, stream: bool, include_usage: bool
) -> None:
    direct = await ask_async(pair.direct, kind, stream, include_usage)
    routed = await ask_async(pair.router, kind, stream, include_usage)
    check(kind, stream, include_usage, direct, routed)


def test_stats_chunk_reads_the_same_in_the_named_event_form(pair: Pair) -> None:
    """`X-Router-Stream-Stats: event`: the openai client's SSE parser still yields the chunk."""
    with openai.OpenAI(
        base_url=pair.router.base_url,
        api_key="unused",
        max_retries=0,
        default_headers={"X-Router-Stream-Stats": "event"},
    ) as client:
        chunks = list(client.chat.completions.create(**request("chat", True, False)))
    answer = from_chunks("chat", chunks)
    assert answer.text == "".join(f"tok{i} " for i in range(MAX_TOKENS))
    assert len(answer.stats) == 1
    assert answer.stats[0]["completion_tokens"] == MAX_TOKENS
