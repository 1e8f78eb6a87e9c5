"""`langchain-openai`'s `ChatOpenAI`: `invoke`, `ainvoke`, `stream` and `astream` give the same
message straight from a backend and through kvroute (the router's stats chunk, which has no
choices, reaches LangChain as an empty chunk and adds nothing to the message)."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_openai import ChatOpenAI

from tests.compat.conftest import MODEL, ONE_LOOP, Pair, Target

MAX_TOKENS = 5
MESSAGES = [("system", "You are terse."), ("human", "Say hello in three languages.")]
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(MAX_TOKENS))


@dataclass(frozen=True, slots=True)
class Said:
    content: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None


def chat(target: Target, *, stream_usage: bool = False) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=target.base_url,
        api_key="unused",  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
        stream_usage=stream_usage,
    )


def said(message: BaseMessage) -> Said:
    usage: Any = getattr(message, "usage_metadata", None) or {}
    return Said(
        content=str(message.content),
        finish_reason=message.response_metadata.get("finish_reason"),
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
    )


def merged(chunks: list[AIMessageChunk]) -> Said:
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    return said(functools.reduce(operator.add, chunks))


def test_invoke(pair: Pair) -> None:
    direct = said(chat(pair.direct).invoke(MESSAGES))
    routed = said(chat(pair.router).invoke(MESSAGES))
    assert routed == direct
    assert routed.content == EXPECTED_TEXT
    assert routed.output_tokens == MAX_TOKENS
    assert routed.finish_reason == "length"
    assert routed.input_tokens


@ONE_LOOP
async def test_ainvoke(pair: Pair) -> None:
    direct = said(await chat(pair.direct).ainvoke(MESSAGES))
    routed = said(await chat(pair.router).ainvoke(MESSAGES))
    assert routed == direct
    assert routed.content == EXPECTED_TEXT


@pytest.mark.parametrize("stream_usage", [False, True])
def test_stream(pair: Pair, stream_usage: bool) -> None:
    direct = merged(list(chat(pair.direct, stream_usage=stream_usage).stream(MESSAGES)))
    routed = merged(list(chat(pair.router, stream_usage=stream_usage).stream(MESSAGES)))
    assert routed == direct
    assert routed.content == EXPECTED_TEXT
    assert routed.finish_reason == "length"
    assert routed.output_tokens == (MAX_TOKENS if stream_usage else None)


@ONE_LOOP
@pytest.mark.parametrize("stream_usage", [False, True])
async def test_astream(pair: Pair, stream_usage: bool) -> None:
    direct_model = chat(pair.direct, stream_usage=stream_usage)
    routed_model = chat(pair.router, stream_usage=stream_usage)
    direct = merged([chunk async for chunk in direct_model.astream(MESSAGES)])
    routed = merged([chunk async for chunk in routed_model.astream(MESSAGES)])
    assert routed == direct
    assert routed.content == EXPECTED_TEXT
    assert routed.finish_reason == "length"
    assert routed.output_tokens == (MAX_TOKENS if stream_usage else None)
