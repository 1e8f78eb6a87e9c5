"""The `openai-agents` SDK running one agent turn over the Responses API: the same answer
straight from a backend and through kvroute (Responses are routed by response id, #15)."""

from __future__ import annotations

import openai
import pytest
from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled

from tests.compat.conftest import MODEL, ONE_LOOP, Pair, Target

# The SDK exports traces to OpenAI by default: never from a test (and the guard would fail it).
set_tracing_disabled(True)


async def one_turn(target: Target) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=target.base_url, api_key="unused", max_retries=0)
    agent = Agent(
        name="terse",
        instructions="You are terse.",
        # No max_tokens: an answer cut at a limit is `incomplete`, which the SDK treats as a
        # failed turn; the simulated model ends its answer by itself.
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
    )
    try:
        result = await Runner.run(agent, "Name three colours.")
    finally:
        await client.close()
    response_id = result.raw_responses[-1].response_id or ""
    return str(result.final_output), response_id


@ONE_LOOP
@pytest.mark.parametrize("via", ["direct", "router"])
async def test_one_agent_turn(pair: Pair, via: str) -> None:
    direct_text, _ = await one_turn(pair.direct)
    text, response_id = await one_turn(pair.router if via == "router" else pair.direct)
    assert text == direct_text
    assert text.startswith("tok0")
    assert response_id.startswith("resp")
