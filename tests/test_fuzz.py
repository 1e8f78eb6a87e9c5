"""Hostile input: whatever the body and headers, the router answers 4xx/2xx, never 5xx, never hangs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RouterServer, running_router, running_simulators

# orjson, which encodes the test bodies, stops at 64-bit integers; bigger ones are sent as raw
# bytes in test_integers_beyond_64_bits_are_a_client_error.
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]) | int64},
        optional={"content": json_values, "name": json_values},
    ),
    max_size=5,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["sim-model", "nope", ""]) | json_values,
        "messages": messages | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
        | json_values,
        "max_tokens": st.integers(min_value=-5, max_value=40) | json_values,
        "temperature": json_values,
        "cache_salt": json_values,
        "n": json_values,
    },
)
# What an HTTP client can send: printable ASCII without surrounding spaces (h11 refuses those).
header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40
).map(str.strip)


@pytest.fixture(scope="module")
def router() -> Iterator[RouterServer]:
    with (
        running_simulators(
            1, base_ttft_s=0.0, prefill_s_per_token=0.0, decode_tokens_per_s=10000.0
        ) as sims,
        running_router([sims[0].url], served_model="sim-model", max_body_bytes=4096) as r,
    ):
        yield r


CLIENT = httpx.Client(timeout=10)


def post(
    router: RouterServer, path: str, content: bytes, headers: dict[str, str]
) -> httpx.Response:
    return CLIENT.post(
        f"{router.url}{path}",
        content=content,
        headers={"content-type": "application/json", **headers},
    )


def check(resp: httpx.Response, *, ours: bool = True) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if (
        ours
        and resp.status_code >= 400
        and resp.headers.get("content-type", "").startswith("application/json")
    ):
        body: Any = resp.json()
        error = body.get("error")
        assert error is not None, body
        # vLLM's own 401 body is {"error": "Unauthorized"}; everything of ours is an object.
        assert isinstance(error, dict | str)


def test_integers_beyond_64_bits_are_a_client_error(router: RouterServer) -> None:
    huge = "-9223372036854775809"
    for body in (
        f'{{"model": "sim-model", "messages": [{{"role": {huge}}}]}}',
        f'{{"model": "sim-model", "max_tokens": {huge[1:]}0, "messages": [{{"role": "user", "content": "hi"}}]}}',
    ):
        resp = post(router, "/v1/chat/completions", body.encode(), {})
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
        check(resp)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=chat_bodies, tenant=header_values, stats=header_values)
def test_chat_bodies_never_5xx(
    router: RouterServer, body: dict[str, Any], tenant: str, stats: str
) -> None:
    resp = post(
        router,
        "/v1/chat/completions",
        orjson.dumps(body),
        {"X-Tenant-ID": tenant, "X-Router-Stream-Stats": stats, "X-Forwarded-For": tenant},
    )
    check(resp)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.binary(max_size=6000),
    path=st.sampled_from(
        ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"]
    ),
)
def test_raw_bytes_never_5xx(router: RouterServer, raw: bytes, path: str) -> None:
    # Passthrough paths relay the backend's own body (the simulator, like vLLM without an
    # embedding model, answers 404 {"detail": ...} there).
    check(post(router, path, raw, {}), ours=path in ("/v1/chat/completions", "/v1/completions"))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=json_values, model=st.sampled_from(["sim-model", "x"]) | json_values)
def test_completion_bodies_never_5xx(router: RouterServer, prompt: Any, model: Any) -> None:
    check(
        post(
            router,
            "/v1/completions",
            orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 2}),
            {},
        )
    )


def test_router_still_serves_after_the_fuzzing(router: RouterServer) -> None:
    resp = post(
        router,
        "/v1/chat/completions",
        orjson.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
        {},
    )
    assert resp.status_code == 200
