"""Request validation (pure): the JSON body, the fields the router reads, the request id.

Every check raises `BadRequest` (or a subclass) with an OpenAI-style message naming the field;
nothing the client sends reaches a 500.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import orjson

from app.errors import BadRequest

Kind = Literal["chat", "completions"]
MAX_REQUEST_ID_CHARS = 128


def request_id_from(value: str | None) -> str:
    """The client's `X-Request-Id` when it is short printable ASCII (so router and vLLM logs
    agree on it byte for byte), else a fresh one."""
    if (
        value
        and len(value) <= MAX_REQUEST_ID_CHARS
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value
    return os.urandom(16).hex()


def dump_body(body: Mapping[str, Any]) -> bytes:
    """The body re-serialised after the router changed it; structures orjson cannot write
    (nesting past its limit) are the client's error."""
    try:
        return orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise BadRequest(f"request body cannot be processed: {exc}") from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


_TYPED_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "model": (str, "a string"),
    "stream": (bool, "a boolean"),
    "stream_options": (dict, "an object"),
    "max_tokens": (int, "an integer"),
    "max_completion_tokens": (int, "an integer"),
    "n": (int, "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "user": (str, "a string"),
    "cache_salt": (str, "a string"),
}


MAX_CHOICES = 128  # `n`: OpenAI's limit


def check_fields(
    body: Mapping[str, Any], kind: Kind, max_messages: int, max_tokens_cap: int
) -> None:
    _check_types(body)
    _check_token_counts(body, max_tokens_cap)
    if kind == "chat":
        _check_messages(body.get("messages"), max_messages)
    else:
        _check_prompt(body.get("prompt"))


def _check_types(body: Mapping[str, Any]) -> None:
    for name, (types, words) in _TYPED_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise BadRequest(f"'{name}' must be {words}", param=name)


def _check_token_counts(body: Mapping[str, Any], cap: int) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if isinstance(value, int) and value < 1:
            # A negative max_tokens would also refill the tenant's token allowance.
            raise BadRequest(f"'{name}' must be at least 1, not {value}", param=name)
        if cap and name != "n" and isinstance(value, int) and value > cap:
            raise BadRequest(f"'{name}' is {value}; this router allows at most {cap}", param=name)
    n = body.get("n")
    if isinstance(n, int) and n > MAX_CHOICES:
        # vLLM's own bound is 16384 (VLLM_MAX_N_SEQUENCES): each choice is a sequence it
        # schedules and holds KV cache for.
        raise BadRequest(f"'n' is {n}; at most {MAX_CHOICES} (as OpenAI)", param="n")


def _check_messages(messages: Any, max_messages: int) -> None:
    if messages is None:
        raise BadRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    if len(messages) > max_messages:
        raise BadRequest(
            f"'messages' has {len(messages)} entries; the limit is {max_messages}",
            param="messages",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"messages[{i}] must be an object with a string 'role'", param="messages"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"messages[{i}].content must be a string or an array of parts", param="messages"
            )


def _check_prompt(prompt: Any) -> None:
    if prompt is None:
        raise BadRequest("'prompt' is required", param="prompt")
    if not _is_prompt(prompt):
        raise BadRequest(
            "'prompt' must be a string, an array of strings or an array of token ids",
            param="prompt",
        )


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return True
    return all(
        isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    )
