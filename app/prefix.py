"""Prefix keys: which requests can share KV-cache blocks (pure).

    conversation_key = sha256(tenant | model | normalized_system_prompt | normalized_prefix_window)[:32]
    system_key       = sha256(tenant | model | normalized_system_prompt)[:32]

Normalisation: runs of whitespace become one space and ends are stripped; content given as a list
of parts is the concatenation of its text parts, other parts stand in as `[type:sha256-prefix]`; the
system prompt is every leading `system`/`developer` message, joined by newlines, in order. The prefix
window is the opening of the conversation after the system prompt, up to and including the first
user message, rendered as `role: content` and cut to `window_chars`: every later turn of the same
conversation has the same opening, so it maps to the same key. A `/v1/completions` prompt has no
system part; its window is the opening of the prompt. A `cache_salt` is part of the tenant, because
vLLM never shares blocks across salts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KEY_CHARS = 32
_WHITESPACE = re.compile(r"\s+")
_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True, slots=True)
class PrefixKeys:
    conversation: str
    system: str
    prompt_chars: int  # all prompt text, for token estimates
    system_chars: int  # the system prompt's share of it


def normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def content_text(content: Any) -> str:
    """Text of a message's `content`: a string, None, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, Mapping):
                kind = str(part.get("type", ""))
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                else:
                    digest = hashlib.sha256(repr(part.get(kind, part)).encode()).hexdigest()[:16]
                    pieces.append(f"[{kind}:{digest}]")
            elif isinstance(part, str):
                pieces.append(part)
        return "".join(pieces)
    return str(content)


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:KEY_CHARS]


def effective_tenant(tenant: str, cache_salt: object) -> str:
    return f"{tenant}#salt={cache_salt}" if isinstance(cache_salt, str) and cache_salt else tenant


def chat_keys(
    tenant: str, model: str, messages: Sequence[Mapping[str, Any]], window_chars: int
) -> PrefixKeys:
    system_parts: list[str] = []
    index = 0
    while index < len(messages) and messages[index].get("role") in _SYSTEM_ROLES:
        system_parts.append(content_text(messages[index].get("content")))
        index += 1
    system = normalize("\n".join(system_parts))

    opening: list[str] = []
    for message in messages[index:]:
        role = str(message.get("role", ""))
        opening.append(f"{role}: {normalize(content_text(message.get('content')))}")
        if role == "user":
            break
    window = "\n".join(opening)[:window_chars]

    prompt_chars = sum(len(content_text(m.get("content"))) for m in messages)
    system_chars = sum(len(p) for p in system_parts)
    return PrefixKeys(
        conversation=digest(tenant, model, system, window),
        system=digest(tenant, model, system),
        prompt_chars=prompt_chars,
        system_chars=system_chars,
    )


def completion_keys(tenant: str, model: str, prompt: Any, window_chars: int) -> PrefixKeys:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, list):  # token ids
        text = " ".join(str(token) for token in prompt)
        window = text[:window_chars]
        prompt_chars = len(prompt) * 4
    else:
        text = prompt if isinstance(prompt, str) else ""
        window = normalize(text[: window_chars * 2])[:window_chars]
        prompt_chars = len(text)
    return PrefixKeys(
        conversation=digest(tenant, model, "", window),
        system=digest(tenant, model, ""),
        prompt_chars=prompt_chars,
        system_chars=0,
    )
