"""The `litellm` SDK (`completion`, `acompletion`; `model="openai/<served>"`, `api_base`): the
same answer, streamed and not, straight from a backend and through kvroute."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from tests.compat.conftest import MODEL, ONE_LOOP, Pair, Target

MAX_TOKENS = 7
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count to seven."},
]
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(MAX_TOKENS))
# (stream, include_usage)
MODES = [(False, False), (True, False), (True, True)]


@dataclass(frozen=True, slots=True)
class Said:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def kwargs(target: Target, stream: bool, include_usage: bool) -> dict[str, Any]:
    call: dict[str, Any] = {
        "model": f"openai/{MODEL}",
        "api_base": target.base_url,
        "api_key": "unused",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "max_retries": 0,
        "num_retries": 0,
    }
    if stream:
        call["stream"] = True
        if include_usage:
            call["stream_options"] = {"include_usage": True}
    return call


def from_whole(response: Any) -> Said:
    choice = response.choices[0]
    return Said(
        choice.message.content,
        choice.finish_reason,
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
    )


def from_chunks(chunks: list[Any], include_usage: bool) -> Said:
    text = ""
    finish = None
    usage = None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = getattr(chunk, "usage", None) or usage
    # Without include_usage litellm may fill in usage of its own (a local estimate): only a
    # usage the server sent is compared.
    return Said(
        text,
        finish,
        usage.prompt_tokens if usage and include_usage else None,
        usage.completion_tokens if usage and include_usage else None,
    )


def ask(litellm: ModuleType, target: Target, stream: bool, include_usage: bool) -> Said:
    response = litellm.completion(**kwargs(target, stream, include_usage))
    return from_chunks(list(response), include_usage) if stream else from_whole(response)


async def ask_async(litellm: ModuleType, target: Target, stream: bool, include_usage: bool) -> Said:
    response = await litellm.acompletion(**kwargs(target, stream, include_usage))
    if stream:
        return from_chunks([chunk async for chunk in response], include_usage)
    return from_whole(response)


def check(direct: Said, routed: Said, stream: bool, include_usage: bool) -> None:
    assert routed == direct
    assert routed.text == EXPECTED_TEXT
    assert routed.finish_reason == "length"
    if not stream or include_usage:
        assert routed.completion_tokens == MAX_TOKENS
        assert routed.prompt_tokens


@pytest.mark.parametrize(("stream", "include_usage"), MODES)
def test_completion(litellm: ModuleType, pair: Pair, stream: bool, include_usage: bool) -> None:
    direct = ask(litellm, pair.direct, stream, include_usage)
    routed = ask(litellm, pair.router, stream, include_usage)
    check(direct, routed, stream, include_usage)


@ONE_LOOP
@pytest.mark.parametrize(("stream", "include_usage"), MODES)
async def test_acompletion(
    litellm: ModuleType, pair: Pair, stream: bool, include_usage: bool
) -> None:
    direct = await ask_async(litellm, pair.direct, stream, include_usage)
    routed = await ask_async(litellm, pair.router, stream, include_usage)
    check(direct, routed, stream, include_usage)
