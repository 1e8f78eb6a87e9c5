"""Prefix keys: which requests can share KV-cache blocks (pure).

    conversation_key = sha256(tenant | model | normalized_system_prompt | normalized_prefix_window)[:32]
    system_key       = sha256(tenant | model | normalized_system_prompt)[:32]

Normalisation: runs of whitespace become one space and ends are stripped; content given as a list
of parts is the concatenation of its text parts, other parts stand in as `[type:sha256-prefix]`
(of their JSON, sampled at both ends when long); the system prompt is every leading
`system`/`developer` message, joined by newlines, in order, up to 16 windows. The prefix
window is the opening of the conversation after the system prompt, up to and including the first
user message, rendered as `role: content` and cut to `window_chars`: every later turn of the same
conversation has the same opening, so it maps to the same key. A `/v1/completions` prompt has no
system part; its window is the opening of the prompt. A `cache_salt` is part of the tenant, because
vLLM never shares blocks across salts. Building the keys reads only these windows of the
messages, so its cost does not grow with the size of the body.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

KEY_CHARS = 32
# The system prompt counts up to this many windows: two longer ones that open alike share
# their KV blocks that far anyway, and a huge one costs no more to key than this.
SYSTEM_WINDOW_FACTOR = 16
_PART_SAMPLE = 4096
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


def normalize_prefix(text: str, limit: int) -> str:
    """`normalize(text)[:limit]`, reading only as much of `text` as that needs.

    A cut normalised is a prefix of the whole normalised, up to its stripped trailing space: so
    once a cut normalises to more than `limit` characters, its first `limit` are the answer."""
    size = max(limit * 2, 64)
    while True:
        cut = text[:size]
        normal = normalize(cut)
        if len(normal) > limit or len(cut) == len(text):
            return normal[:limit]
        size *= 4


def _part_digest(part: Mapping[str, Any], kind: str) -> str:
    """A short digest of a non-text part (an image, audio): its JSON, sampled at both ends."""
    try:
        data = orjson.dumps(part.get(kind, part), option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        data = kind.encode()  # unhashable as JSON (too deep): the part still shapes the key
    if len(data) > 2 * _PART_SAMPLE:
        data = b"%d|%b|%b" % (len(data), data[:_PART_SAMPLE], data[-_PART_SAMPLE:])
    return hashlib.sha256(data).hexdigest()[:16]


def content_text(content: Any, limit: int | None = None) -> str:
    """Text of a message's `content`: a string, None, or a list of OpenAI content parts; at
    least the first `limit` characters of it when a limit is given."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content if limit is None else content[:limit]
    if not isinstance(content, list):
        return str(content)[: limit or None]
    pieces: list[str] = []
    size = 0
    for part in content:
        if limit is not None and size >= limit:
            break
        piece = ""
        if isinstance(part, Mapping):
            kind = str(part.get("type", ""))
            piece = (
                str(part.get("text", ""))
                if kind == "text"
                else f"[{kind}:{_part_digest(part, kind)}]"
            )
        elif isinstance(part, str):
            piece = part
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def content_chars(content: Any) -> int:
    """Characters of text in `content`, without building it."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(p) if isinstance(p, str) else len(str(p.get("text", "")))
            for p in content
            if isinstance(p, str) or (isinstance(p, Mapping) and p.get("type") == "text")
        )
    return 0


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:KEY_CHARS]


def effective_tenant(tenant: str, cache_salt: object) -> str:
    return f"{tenant}#salt={cache_salt}" if isinstance(cache_salt, str) and cache_salt else tenant


def chat_keys(
    tenant: str, model: str, messages: Sequence[Mapping[str, Any]], window_chars: int
) -> PrefixKeys:
    """Keys of a chat request; reads at most a window of each message it looks at."""
    system_limit = window_chars * SYSTEM_WINDOW_FACTOR
    system_parts: list[str] = []
    index = 0
    while index < len(messages) and messages[index].get("role") in _SYSTEM_ROLES:
        # Each part read to the limit plus slack: normalising may shrink it.
        system_parts.append(content_text(messages[index].get("content"), system_limit * 4))
        index += 1
    system = normalize_prefix("\n".join(system_parts), system_limit)

    opening: list[str] = []
    for message in messages[index:]:
        role = str(message.get("role", ""))
        text = content_text(message.get("content"), window_chars * 4)
        opening.append(f"{role}: {normalize_prefix(text, window_chars)}")
        if role == "user":
            break
    window = "\n".join(opening)[:window_chars]

    prompt_chars = sum(content_chars(m.get("content")) for m in messages)
    system_chars = sum(content_chars(messages[i].get("content")) for i in range(index))
    return PrefixKeys(
        conversation=digest(tenant, model, system, window),
        system=digest(tenant, model, system),
        prompt_chars=prompt_chars,
        system_chars=system_chars,
    )


def completion_keys(tenant: str, model: str, prompt: Any, window_chars: int) -> PrefixKeys:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, list):  # token ids: each at least one character and a space
        window = " ".join(str(token) for token in prompt[:window_chars])[:window_chars]
        prompt_chars = len(prompt) * 4
    else:
        text = prompt if isinstance(prompt, str) else ""
        window = normalize_prefix(text, window_chars)
        prompt_chars = len(text)
    return PrefixKeys(
        conversation=digest(tenant, model, "", window),
        system=digest(tenant, model, ""),
        prompt_chars=prompt_chars,
        system_chars=0,
    )
