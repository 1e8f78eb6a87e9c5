from __future__ import annotations

from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.prefix import (
    chat_keys,
    completion_keys,
    content_text,
    effective_tenant,
    normalize,
    normalize_prefix,
)


def conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


SYSTEM = ("system", "You are a helpful assistant.")
OPENING = ("user", "Tell me about KV caches.")


def test_every_turn_of_a_conversation_maps_to_the_same_key() -> None:
    first = chat_keys("t", "m", conv(SYSTEM, OPENING), 2048)
    later = chat_keys(
        "t",
        "m",
        conv(SYSTEM, OPENING, ("assistant", "They store keys."), ("user", "More?")),
        2048,
    )
    assert first.conversation == later.conversation
    assert first.system == later.system
    assert later.prompt_chars > first.prompt_chars


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("You are  a helpful\n assistant.", "You are a helpful assistant."),
        ("  You are a helpful assistant.\t", "You are a helpful assistant."),
    ],
)
def test_whitespace_is_normalised(a: str, b: str) -> None:
    ka = chat_keys("t", "m", conv(("system", a), OPENING), 64)
    kb = chat_keys("t", "m", conv(("system", b), OPENING), 64)
    assert (ka.conversation, ka.system) == (kb.conversation, kb.system)


def test_content_parts_equal_the_plain_string() -> None:
    parts = [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "KV caches."}]
    plain = chat_keys("t", "m", conv(SYSTEM, OPENING), 2048)
    listed = chat_keys(
        "t",
        "m",
        [dict(zip(("role", "content"), SYSTEM, strict=True)), {"role": "user", "content": parts}],
        2048,
    )
    assert listed.conversation == plain.conversation


def test_images_are_part_of_the_key() -> None:
    def with_image(url: str) -> list[dict[str, object]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    assert (
        chat_keys("t", "m", with_image("a.png"), 64).conversation
        != chat_keys("t", "m", with_image("b.png"), 64).conversation
    )
    assert content_text(None) == ""


@pytest.mark.parametrize("field", ["tenant", "model", "system", "opening"])
def test_each_component_changes_the_key(field: str) -> None:
    base = {"tenant": "t", "model": "m", "system": SYSTEM[1], "opening": OPENING[1]}
    other = {**base, field: base[field] + "!"}

    def key(d: dict[str, str]) -> str:
        msgs = conv(("system", d["system"]), ("user", d["opening"]))
        return chat_keys(d["tenant"], d["model"], msgs, 2048).conversation

    assert key(base) != key(other)


def test_system_key_ignores_the_conversation() -> None:
    a = chat_keys("t", "m", conv(SYSTEM, ("user", "one")), 2048)
    b = chat_keys("t", "m", conv(SYSTEM, ("user", "two")), 2048)
    assert a.system == b.system
    assert a.conversation != b.conversation


def test_window_cuts_the_opening() -> None:
    a = chat_keys("t", "m", conv(("user", "x" * 100 + "tail A")), 32)
    b = chat_keys("t", "m", conv(("user", "x" * 100 + "tail B")), 32)
    assert a.conversation == b.conversation


def test_several_system_messages_in_order() -> None:
    ab = chat_keys("t", "m", conv(("system", "A"), ("developer", "B"), OPENING), 64)
    ba = chat_keys("t", "m", conv(("system", "B"), ("developer", "A"), OPENING), 64)
    assert ab.system != ba.system
    assert ab.system_chars == 2


def test_key_is_32_hex_chars() -> None:
    key = chat_keys("t", "m", conv(OPENING), 64).conversation
    assert len(key) == 32
    int(key, 16)


def test_completion_prompts() -> None:
    a = completion_keys("t", "m", "Once upon a time " * 50 + "A", 64)
    b = completion_keys("t", "m", "Once upon a time " * 50 + "B", 64)
    assert a.conversation == b.conversation
    assert completion_keys("t", "m", ["Once upon"], 64) == completion_keys(
        "t", "m", "Once upon", 64
    )
    ids = completion_keys("t", "m", [1, 2, 3], 64)
    assert ids.prompt_chars == 12
    assert ids.conversation != completion_keys("t", "m", [1, 2, 4], 64).conversation


def test_cache_salt_joins_the_tenant() -> None:
    assert effective_tenant("t", "s1") == "t#salt=s1"
    assert effective_tenant("t", None) == "t"
    assert effective_tenant("t", "") == "t"
    assert normalize(" a \n b ") == "a b"


@given(st.text(alphabet=" \t\nab", max_size=300), st.integers(min_value=1, max_value=50))
def test_normalize_prefix_equals_normalize_then_cut(text: str, limit: int) -> None:
    assert normalize_prefix(text, limit) == normalize(text)[:limit]


class _Watched(str):
    """A string that records how much of it is sliced out."""

    reads: ClassVar[list[int]] = []

    def __getitem__(self, key: Any) -> str:
        piece = str.__getitem__(self, key)
        _Watched.reads.append(len(piece))
        return piece


def test_keys_read_only_a_window_of_a_huge_message() -> None:
    window = 2048
    huge = _Watched("word " * 3_000_000)  # 15 MB
    _Watched.reads.clear()
    keys = chat_keys(
        "t", "m", [{"role": "system", "content": huge}, {"role": "user", "content": huge}], window
    )
    assert max(_Watched.reads) <= window * 16 * 4
    assert keys.prompt_chars == 2 * len(huge)
    # The same keys as the messages cut to what was read: nothing past the window counts.
    short = str.__getitem__(huge, slice(0, window * 64))
    cut = chat_keys(
        "t", "m", [{"role": "system", "content": short}, {"role": "user", "content": short}], window
    )
    assert (keys.conversation, keys.system) == (cut.conversation, cut.system)
