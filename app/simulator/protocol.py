"""OpenAI/vLLM wire shapes of the simulator: request parsing and validation, response bodies.

Pure functions from bytes and headers to a `SimRequest` (or a `SimError` carrying vLLM's status,
message, type and param), and from values to the JSON objects vLLM 0.32 sends: non-stream bodies,
stream chunks, usage, error bodies and the model card.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from app.simulator.config import SimConfig
from app.simulator.prompt import render_chat, tokenize_bytes

Endpoint = Literal["chat", "completions"]

DONE_EVENT = b"data: [DONE]\n\n"

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


class SimError(Exception):
    """A request the simulated server answers with an error status and vLLM's nested body."""

    def __init__(
        self, status: int, message: str, *, type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


def _validation_error(kind: str, loc: str, msg: str, value: Any) -> SimError:
    """FastAPI's request-validation error as vLLM renders it: type "Bad Request", param = loc."""
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    return SimError(400, f"1 validation error:\n  {detail!r}", type="Bad Request", param=loc)


def _sanitised(value: Any) -> Any:
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return value


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One validated generation request."""

    endpoint: Endpoint
    id: str  # "chatcmpl-<rid>" / "cmpl-<rid>"
    model: str
    created: int
    prompt_tokens: tuple[int, ...]
    prompt_bytes: bytes | None  # None when the prompt came as token ids
    max_tokens: int
    stream: bool
    include_usage: bool
    cache_salt: str | None

    @property
    def object_name(self) -> str:
        if self.endpoint == "chat":
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"


# --- request parsing -----------------------------------------------------------------------
def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        detail = {
            "type": "json_invalid",
            "loc": f"body.{exc.pos}",
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        raise SimError(
            400, f"1 validation error:\n  {detail!r}", type="Bad Request", param=f"body.{exc.pos}"
        ) from exc
    if not isinstance(data, dict):
        raise _validation_error(
            "model_attributes_type", "body", "Input should be a valid dictionary", _sanitised(data)
        )
    return data


_Kind = Literal["str", "int", "number", "bool", "list", "dict"]
_KIND_ERRORS: dict[str, tuple[str, str]] = {
    "str": ("string_type", "Input should be a valid string"),
    "int": ("int_type", "Input should be a valid integer"),
    "number": ("float_type", "Input should be a valid number"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "list": ("list_type", "Input should be a valid list"),
    "dict": ("dict_type", "Input should be a valid dictionary"),
}


def _optional(data: Mapping[str, Any], key: str, kind: _Kind) -> Any:
    """`data[key]` checked against `kind`; None when absent or null."""
    value = data.get(key)
    if value is None:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "int" and is_number and float(value).is_integer():
        return int(value)
    ok = {
        "str": isinstance(value, str),
        "int": False,
        "number": is_number,
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        error, msg = _KIND_ERRORS[kind]
        raise _validation_error(error, f"body.{key}", msg, _sanitised(value))
    return value


def _check_messages(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in data:
        raise _validation_error("missing", "body.messages", "Field required", _sanitised(data))
    messages: list[dict[str, Any]] | None = _optional(data, "messages", "list")
    if messages is None:
        raise _validation_error("list_type", "body.messages", "Input should be a valid list", None)
    for i, message in enumerate(messages):
        loc = f"body.messages.{i}"
        if not isinstance(message, dict):
            raise _validation_error(
                "dict_type", loc, "Input should be a valid dictionary", _sanitised(message)
            )
        if not isinstance(message.get("role"), str):
            raise _validation_error("missing", f"{loc}.role", "Field required", _sanitised(message))
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _validation_error(
                "string_type", f"{loc}.content", "Input should be a valid string", content
            )
    return messages


def _prompt(data: Mapping[str, Any]) -> tuple[tuple[int, ...], bytes | None]:
    if "prompt" not in data:
        raise _validation_error("missing", "body.prompt", "Field required", _sanitised(data))
    prompt = data["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise SimError(400, "Prompt cannot be empty.", param="prompt")
        encoded = prompt.encode("utf-8")
        return tokenize_bytes(encoded), encoded
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if not prompt:
            raise SimError(400, "Prompt cannot be empty.", param="prompt")
        return tuple(prompt), None
    if isinstance(prompt, list):
        raise SimError(
            400, "The simulator takes one prompt per request, not a batch.", param="prompt"
        )
    raise _validation_error("string_type", "body.prompt", "Input should be a valid string", prompt)


def request_id(headers: Mapping[str, str], data: Mapping[str, Any]) -> str:
    """`X-Request-Id` header, else the body's `request_id`, else random hex (vLLM's order)."""
    rid = headers.get("x-request-id") or data.get("request_id")
    return rid if isinstance(rid, str) and rid else secrets.token_hex(8)


def parse_request(
    endpoint: Endpoint, body: bytes, headers: Mapping[str, str], config: SimConfig
) -> SimRequest:
    """Validate a generation request in vLLM's order: schema, model, sampling, lengths."""
    data = parse_json_object(body)
    if endpoint == "chat":
        messages = _check_messages(data)
        prompt_tokens: tuple[int, ...] | None = None
        prompt_bytes: bytes | None = None
    else:
        prompt_tokens, prompt_bytes = _prompt(data)
    model = _optional(data, "model", "str")
    stream = bool(_optional(data, "stream", "bool"))
    stream_options = _optional(data, "stream_options", "dict")
    max_tokens = _optional(data, "max_tokens", "int")
    max_completion_tokens = _optional(data, "max_completion_tokens", "int")
    temperature = _optional(data, "temperature", "number")
    n = _optional(data, "n", "int")
    salt = _optional(data, "cache_salt", "str")
    _optional(data, "ignore_eos", "bool")
    _optional(data, "request_id", "str")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise SimError(
                400,
                "Stream options can only be defined when `stream=True`.",
                param="stream_options",
            )
        include_usage = bool(_optional(stream_options, "include_usage", "bool"))

    served = config.served_models
    if model is None:
        model = served[0]
    elif model not in served:
        raise SimError(
            404,
            f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
            param="model",
        )
    if temperature is not None and temperature < 0:
        raise SimError(
            400,
            f"temperature must be non-negative, got {float(temperature)}. "
            f"(parameter=temperature, value={float(temperature)})",
            param="temperature",
        )
    if n is not None and n != 1:
        raise SimError(400, f"The simulator supports n=1 only, got n={n}.", param="n")
    if salt is not None and not 1 <= len(salt) <= 1024:
        raise SimError(
            400,
            "Parameter 'cache_salt' must be a non-empty string if provided.",
            param="cache_salt",
        )
    limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
    if limit is not None and limit < 1:
        raise SimError(
            400,
            f"max_tokens must be at least 1, got {limit}. (parameter=max_tokens, value={limit})",
            param="max_tokens",
        )
    if limit is not None and limit > config.max_model_len:
        raise SimError(
            400,
            f"max_tokens={limit} cannot be greater than max_model_len={config.max_model_len}. "
            f"Please request fewer output tokens. (parameter=max_tokens, value={limit})",
            param="max_tokens",
        )

    if endpoint == "chat":
        prompt_bytes = render_chat(messages).encode("utf-8")
        prompt_tokens = tokenize_bytes(prompt_bytes)
    assert prompt_tokens is not None
    num_prompt = len(prompt_tokens)
    if num_prompt > config.max_model_len:
        shown = config.max_model_len + 1
        raise SimError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"your prompt contains at least {shown} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={shown})",
            param="input_tokens",
        )
    room = config.max_model_len - num_prompt
    if limit is None:
        limit = min(config.default_max_tokens, room)
    if limit < 1 or limit > room:
        raise SimError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"you requested {num_prompt + max(limit, 1)} tokens ({num_prompt} in the messages, "
            f"{max(limit, 1)} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="max_tokens",
        )

    rid = request_id(headers, data)
    return SimRequest(
        endpoint=endpoint,
        id=f"chatcmpl-{rid}" if endpoint == "chat" else f"cmpl-{rid}",
        model=model,
        created=int(time.time()),
        prompt_tokens=prompt_tokens,
        prompt_bytes=prompt_bytes,
        max_tokens=limit,
        stream=stream,
        include_usage=include_usage,
        cache_salt=salt,
    )


# --- response bodies ---------------------------------------------------------------------
def usage(
    request: SimRequest,
    completion_tokens: int,
    cached_tokens: int,
    created_tokens: int,
    config: SimConfig,
) -> dict[str, Any]:
    prompt_tokens = len(request.prompt_tokens)
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if config.prompt_tokens_details:
        details: dict[str, Any] = {"cached_tokens": cached_tokens}
        if request.endpoint == "chat":
            details["created_cache_tokens"] = created_tokens
        result["prompt_tokens_details"] = details
    return result


def completion_body(request: SimRequest, text: str, usage_info: dict[str, Any]) -> dict[str, Any]:
    """Non-stream response of /v1/chat/completions or /v1/completions."""
    choice: dict[str, Any]
    if request.endpoint == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    return {
        "id": request.id,
        "object": request.object_name,
        "created": request.created,
        "model": request.model,
        "choices": [choice],
        "usage": usage_info,
    }


def _chunk(request: SimRequest, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": request.id,
        "object": request.object_name,
        "created": request.created,
        "model": request.model,
        "choices": choices,
    }


def role_chunk(request: SimRequest) -> dict[str, Any]:
    """First chat chunk: the assistant role with empty content."""
    return _chunk(
        request,
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    )


def content_chunk(request: SimRequest, fragment: str, finish_reason: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if request.endpoint == "chat":
        choice["delta"] = {"content": fragment}
    else:
        choice["text"] = fragment
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    if finish_reason is not None or request.endpoint == "completions":
        choice["stop_reason"] = None
    return _chunk(request, [choice])


def usage_chunk(request: SimRequest, usage_info: dict[str, Any]) -> dict[str, Any]:
    chunk = _chunk(request, [])
    chunk["usage"] = usage_info
    return chunk


def sse_event(payload: Mapping[str, Any]) -> bytes:
    """`data: <compact json>\\n\\n`, the only event form vLLM uses for these endpoints."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def models_body(config: SimConfig, created: int) -> dict[str, Any]:
    root = config.served_models[0]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": None,
                "max_model_len": config.max_model_len,
            }
            for name in config.served_models
        ],
    }
