"""The simulator's Responses API (vLLM 0.32 with `VLLM_ENABLE_RESPONSES_API_STORE=1`): request
parsing, the per-server store, and the bodies and stream events vLLM sends.

As in vLLM, a stored response is kept in memory forever, a `previous_response_id` is looked up in
this server's store only (404 when it is not there), the new turn's prompt is the previous turn's
input messages (system ones dropped: instructions do not carry over), its output, then the new
input; `previous_input_messages` is accepted but only read by vLLM for Harmony (gpt-oss) models,
so here, as for vLLM's other models, it is ignored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.simulator.config import SimConfig
from app.simulator.prompt import content_text, render_chat, tokenize_bytes
from app.simulator.protocol import (
    SimError,
    SimRequest,
    _optional,
    _sanitised,
    _validation_error,
    parse_json_object,
)

_TOOL_ITEMS = ("function_call", "function_call_output")


@dataclass(slots=True)
class Stored:
    """One stored response: its body (updated by cancel) and the input messages of its turn."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]


@dataclass(slots=True)
class ResponseStore:
    """vLLM's `response_store` and `msg_store`: unbounded, in memory, per server."""

    enabled: bool = True
    items: dict[str, Stored] = field(default_factory=dict)

    def get(self, response_id: str) -> Stored:
        stored = self.items.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return stored

    def cancel(self, response_id: str) -> dict[str, Any]:
        stored = self.get(response_id)
        if stored.body["status"] not in ("queued", "in_progress"):
            raise SimError(
                400,
                "Cannot cancel a synchronous response.",
                type="invalid_request_error",
                param="response_id",
            )
        stored.body["status"] = "cancelled"
        return stored.body


def not_found(response_id: str) -> SimError:
    return SimError(
        404,
        f"Response with id '{response_id}' not found.",
        type="invalid_request_error",
        param="response_id",
    )


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """A validated `POST /v1/responses`: the generation and what the answer echoes."""

    request: SimRequest
    messages: list[dict[str, Any]]  # this turn's input as chat messages (what the store keeps)
    instructions: str | None
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    # The client set max_output_tokens: the answer stops there (`incomplete`, as vLLM says).
    # Without it the simulated model ends on its own (`completed`), as a model reaching EOS.
    limit_given: bool = False


def input_messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages: a string is one user message; message items keep their role."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _validation_error(
            "string_type", "body.input", "Input should be a valid string", value
        )
    messages = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and item.get("type") in _TOOL_ITEMS:
            # A tool call or its output: rendered as its JSON, as a template would show it.
            role = "assistant" if item["type"] == "function_call" else "tool"
            messages.append({"role": role, "content": orjson.dumps(item).decode()})
            continue
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _validation_error(
                "missing", f"body.input.{i}.role", "Field required", _sanitised(item)
            )
        messages.append({"role": item["role"], "content": content_text(item.get("content"))})
    return messages


def output_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stored response's output messages as assistant turns (reasoning items skipped)."""
    out = []
    for item in body.get("output") or []:
        if item.get("type") == "message":
            for part in item.get("content") or []:
                out.append({"role": "assistant", "content": part.get("text", "")})
    return out


def parse_responses(
    body: bytes, headers: Mapping[str, str], config: SimConfig, store: ResponseStore
) -> ResponsesCall:
    """Validate in vLLM's order: schema, model, exclusive history fields, the previous id."""
    data = parse_json_object(body)
    if "input" not in data:
        raise _validation_error("missing", "body.input", "Field required", _sanitised(data))
    messages = input_messages(data["input"])
    model = _optional(data, "model", "str")
    instructions = _optional(data, "instructions", "str")
    previous = _optional(data, "previous_response_id", "str")
    stream = bool(_optional(data, "stream", "bool"))
    background = bool(_optional(data, "background", "bool"))
    wants_store = _optional(data, "store", "bool")
    limit = _optional(data, "max_output_tokens", "int")
    temperature = _optional(data, "temperature", "number")
    top_p = _optional(data, "top_p", "number")
    salt = _optional(data, "cache_salt", "str")
    rid = _optional(data, "request_id", "str")
    if model is None:
        model = config.served_models[0]
    elif model not in config.served_models:
        raise SimError(
            404,
            f"The model `{model}` does not exist. "
            f"Valid aliases: {', '.join(config.served_models)}.",
            param="model",
        )
    if data.get("previous_input_messages") and previous:
        raise SimError(
            400,
            "Only one of `previous_input_messages` and `previous_response_id` can be set.",
            type="invalid_request_error",
            param="previous_response_id",
        )
    if background:
        raise SimError(400, "The simulator does not run background responses.", param="background")
    history: list[dict[str, Any]] = []
    if previous is not None:
        stored = store.get(previous)
        history = [m for m in stored.messages if m["role"] != "system"]
        history += output_messages(stored.body)
    system = [{"role": "system", "content": instructions}] if instructions else []
    prompt_bytes = render_chat(system + history + messages).encode("utf-8")
    prompt_tokens = tokenize_bytes(prompt_bytes)
    room = config.max_model_len - len(prompt_tokens)
    if room < 1:
        raise SimError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"your prompt contains at least {config.max_model_len + 1} input tokens.",
            param="input_tokens",
        )
    limit_given = limit is not None
    if limit is None:
        limit = min(config.default_max_tokens, room)
    if not 1 <= limit <= room:
        raise SimError(400, f"max_output_tokens={limit} is out of range.", param="max_tokens")
    request = SimRequest(
        endpoint="chat",
        id=rid or f"resp_{secrets.token_hex(8)}",
        model=model,
        created=int(time.time()),
        prompt_tokens=prompt_tokens,
        prompt_bytes=prompt_bytes,
        max_tokens=limit,
        stream=stream,
        include_usage=True,
        cache_salt=salt,
    )
    return ResponsesCall(
        request=request,
        messages=system + messages,
        instructions=instructions,
        previous_response_id=previous,
        store=store.enabled and wants_store is not False,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        limit_given=limit_given,
    )


# --- bodies and events -----------------------------------------------------------------------
def message_id() -> str:
    return f"msg_{secrets.token_hex(8)}"


def output_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
    ]
    return {
        "id": item_id,
        "content": content if status == "completed" else [],
        "role": "assistant",
        "status": status,
        "type": "message",
        "phase": None,
    }


def responses_usage(
    prompt_tokens: int, output_tokens: int, cached_tokens: int, created_tokens: int
) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": cached_tokens,
            "cache_write_tokens": created_tokens,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt_tokens + output_tokens,
    }


def response_body(
    call: ResponsesCall,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """vLLM's `ResponsesResponse` as JSON, field for field (0.32, non-Harmony model)."""
    request = call.request
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": request.id,
        "created_at": request.created,
        "incomplete_details": incomplete,
        "instructions": call.instructions,
        "metadata": None,
        "model": request.model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": True,
        "temperature": call.temperature,
        "tool_choice": "none",
        "tools": [],
        "top_p": call.top_p,
        "background": False,
        "max_output_tokens": request.max_tokens,
        "max_tool_calls": None,
        "previous_response_id": call.previous_response_id,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "input_messages": None,
        "output_messages": None,
    }


class EventCounter:
    """Numbers a response's stream events as vLLM does: `sequence_number` from 0."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, kind: str, payload: dict[str, Any]) -> bytes:
        data = {**payload, "sequence_number": self.next, "type": kind}
        self.next += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def opening(self, in_progress: dict[str, Any], item_id: str) -> bytes:
        """`response.created` .. `response.content_part.added`: what precedes the first delta."""
        part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
        return (
            self.event("response.created", {"response": in_progress})
            + self.event("response.in_progress", {"response": in_progress})
            + self.event(
                "response.output_item.added",
                {"item": output_item(item_id, "", "in_progress"), "output_index": 0},
            )
            + self.event(
                "response.content_part.added",
                {"content_index": 0, "item_id": item_id, "output_index": 0, "part": part},
            )
        )

    def delta(self, item_id: str, text: str) -> bytes:
        return self.event(
            "response.output_text.delta",
            {
                "content_index": 0,
                "delta": text,
                "item_id": item_id,
                "logprobs": [],
                "output_index": 0,
            },
        )

    def closing(self, item_id: str, text: str, final: dict[str, Any]) -> bytes:
        """`response.output_text.done` .. `response.completed`."""
        where = {"content_index": 0, "item_id": item_id}
        part: dict[str, Any] = {
            "annotations": [],
            "text": text,
            "type": "output_text",
            "logprobs": None,
        }
        return (
            self.event(
                "response.output_text.done",
                {**where, "logprobs": [], "output_index": 0, "text": text},
            )
            + self.event("response.content_part.done", {**where, "output_index": 0, "part": part})
            + self.event(
                "response.output_item.done",
                {"item": output_item(item_id, text), "output_index": 0},
            )
            + self.event("response.completed", {"response": final})
        )
