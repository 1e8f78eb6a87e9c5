"""Router errors reach each client as the matching OpenAI error, streamed or not.

400 (messages not a list), 404 (unknown model) and 413 (body over MAX_BODY_BYTES) come from a
router with a 1 KiB body limit; 429 from the same router (MAX_IN_FLIGHT=1, MAX_QUEUE=0) while
another stream holds the one slot; 503 from a router whose only backend is a closed port.
The `openai` client and LangChain (which raises the openai exceptions) map statuses the same
way; litellm has classes of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from harness.ports import free_port
from harness.simulator import SimulatorThread
from tests.compat.conftest import FAST_SIM, MODEL, ONE_LOOP, Target, admitted_in_flight
from tests.conftest import running_router, running_simulators, wait_for

MAX_BODY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Ask:
    model: str = MODEL
    content: str = "Hi"
    extra_body: dict[str, Any] | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.content}]


@dataclass(frozen=True, slots=True)
class Case:
    status: int
    type: str  # the router's OpenAI error type
    says: str  # part of the router's message, which every client passes on
    ask: Ask


CASES = {
    "bad_body": Case(
        400,
        "invalid_request_error",
        "'messages' must be",
        Ask(extra_body={"messages": "not a list"}),
    ),
    "unknown_model": Case(
        404, "invalid_request_error", "no-such-model", Ask(model="no-such-model")
    ),
    "too_large": Case(
        413,
        "invalid_request_error",
        f"limit is {MAX_BODY_BYTES}",
        Ask(content="x" * (2 * MAX_BODY_BYTES)),
    ),
    "overloaded": Case(429, "rate_limit_error", "queue is full", Ask()),
    "no_backend": Case(503, "service_unavailable", "no backend is healthy", Ask()),
}

OPENAI_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    404: openai.NotFoundError,
    413: openai.APIStatusError,  # the client has no class of its own for 413
    429: openai.RateLimitError,
    503: openai.InternalServerError,
}


def litellm_errors(litellm: ModuleType) -> dict[int, type[Exception]]:
    return {
        400: litellm.BadRequestError,
        404: litellm.NotFoundError,
        413: litellm.APIError,  # litellm's class for a status it does not name
        429: litellm.RateLimitError,
        503: litellm.ServiceUnavailableError,
    }


# ---------------------------------------------------------------------------------------------
# One request per client flavour; each raises what the client raises.

AskFn = Callable[[Target, Ask, bool], Awaitable[None]]


async def openai_sync(target: Target, ask: Ask, stream: bool) -> None:
    with openai.OpenAI(base_url=target.base_url, api_key="unused", max_retries=0) as client:
        response: Any = client.chat.completions.create(
            model=ask.model,
            messages=ask.messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=stream,
            extra_body=ask.extra_body,
        )
        if stream:
            list(response)


async def openai_async(target: Target, ask: Ask, stream: bool) -> None:
    async with openai.AsyncOpenAI(
        base_url=target.base_url, api_key="unused", max_retries=0
    ) as client:
        response: Any = await client.chat.completions.create(
            model=ask.model,
            messages=ask.messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=stream,
            extra_body=ask.extra_body,
        )
        if stream:
            [chunk async for chunk in response]


def langchain_model(target: Target, ask: Ask) -> ChatOpenAI:
    return ChatOpenAI(
        model=ask.model,
        base_url=target.base_url,
        api_key="unused",  # type: ignore[arg-type]
        max_tokens=4,  # type: ignore[call-arg]
        max_retries=0,
        extra_body=ask.extra_body,
    )


async def langchain_sync(target: Target, ask: Ask, stream: bool) -> None:
    model = langchain_model(target, ask)
    if stream:
        list(model.stream(ask.messages))
    else:
        model.invoke(ask.messages)


async def langchain_async(target: Target, ask: Ask, stream: bool) -> None:
    model = langchain_model(target, ask)
    if stream:
        [chunk async for chunk in model.astream(ask.messages)]
    else:
        await model.ainvoke(ask.messages)


def litellm_kwargs(target: Target, ask: Ask, stream: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": f"openai/{ask.model}",
        "api_base": target.base_url,
        "api_key": "unused",
        "messages": ask.messages,
        "max_tokens": 4,
        "stream": stream,
        "max_retries": 0,
        "num_retries": 0,
    }
    if ask.extra_body:
        kwargs["extra_body"] = ask.extra_body
    return kwargs


async def litellm_sync(target: Target, ask: Ask, stream: bool) -> None:
    import litellm

    response = litellm.completion(**litellm_kwargs(target, ask, stream))
    if stream:
        list(response)


async def litellm_async(target: Target, ask: Ask, stream: bool) -> None:
    import litellm

    response = await litellm.acompletion(**litellm_kwargs(target, ask, stream))
    if stream:
        [chunk async for chunk in response]


CLIENTS: dict[str, AskFn] = {
    "openai": openai_sync,
    "openai-async": openai_async,
    "langchain": langchain_sync,
    "langchain-async": langchain_async,
    "litellm": litellm_sync,
    "litellm-async": litellm_async,
}


# ---------------------------------------------------------------------------------------------
# Routers that refuse


@pytest.fixture(scope="module")
def slow_backend() -> Iterator[SimulatorThread]:
    """Decodes 20 tokens/s: a stream through it holds its slot for as long as a test needs."""
    with running_simulators(1, **{**FAST_SIM, "decode_tokens_per_s": 20.0}) as sims:
        yield sims[0]


@pytest.fixture(scope="module")
def strict(slow_backend: SimulatorThread) -> Iterator[Target]:
    with running_router(
        [slow_backend.url],
        served_model=MODEL,
        max_body_bytes=MAX_BODY_BYTES,
        max_in_flight=1,
        max_queue=0,
    ) as router:
        yield Target("strict", router.url)


@pytest.fixture(scope="module")
def fleetless() -> Iterator[Target]:
    """A router whose only backend is a loopback port nobody listens on, once it knows so."""
    with running_router([f"http://127.0.0.1:{free_port()}"], served_model=MODEL) as router:
        wait_for(lambda: httpx.get(f"{router.url}/health", timeout=5).status_code == 503)
        yield Target("fleetless", router.url)


@contextlib.contextmanager
def slot_held(target: Target) -> Iterator[None]:
    """A stream through `target` that has its first bytes, so it holds an admission slot."""
    body = {
        "model": MODEL,
        "max_tokens": 1000,
        "stream": True,
        "messages": [{"role": "user", "content": "hold"}],
    }
    with httpx.stream("POST", f"{target.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()  # kept: a dropped iterator closes the response
        assert next(chunks).startswith(b"data: ")
        assert admitted_in_flight(target.url) == 1
        yield
    # The client left: the router releases the slot (asserted, so the next case starts clean).
    wait_for(lambda: admitted_in_flight(target.url) == 0)


@ONE_LOOP
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("case", list(CASES))
async def test_router_error_surfaces_as_the_matching_client_error(
    request: pytest.FixtureRequest, case: str, client: str, stream: bool
) -> None:
    spec = CASES[case]
    target: Target = request.getfixturevalue("fleetless" if case == "no_backend" else "strict")
    held = slot_held(target) if case == "overloaded" else contextlib.nullcontext()
    ask = CLIENTS[client]
    if client.startswith("litellm"):
        litellm: ModuleType = request.getfixturevalue("litellm")
        expected: type[Exception] = litellm_errors(litellm)[spec.status]
    else:
        expected = OPENAI_ERRORS[spec.status]
    with held, pytest.raises(expected) as caught:
        await ask(target, spec.ask, stream)
    error: Any = caught.value
    assert error.status_code == spec.status
    assert spec.says in str(error)
    if not client.startswith("litellm"):
        # The router's error body, as the openai client parsed it.
        assert error.body["type"] == spec.type
        assert spec.says in error.body["message"]
