"""The simulator's prefix cache (vLLM's block rules) and its prompt tokenisation."""

from __future__ import annotations

import pytest

from app.simulator.cache import PrefixCache, hash_blocks
from app.simulator.prompt import (
    output_bytes_len,
    output_text,
    render_chat,
    sequence_tail,
    tokenize,
    tokenize_bytes,
)

BS = 16


def tokens(start: int, count: int) -> list[int]:
    """`count` distinct token ids starting at `start` (distinct ranges never share a block)."""
    return list(range(start, start + count))


def cache_holding(prompt: list[int], *, capacity: int = 64, salt: str | None = None) -> PrefixCache:
    cache = PrefixCache(BS, capacity)
    allocation = cache.allocate(cache.block_hashes(prompt, salt=salt), len(prompt))
    assert allocation is not None
    cache.release(allocation)
    return cache


# --- tokenisation --------------------------------------------------------------------------
def test_tokens_are_4_byte_chunks() -> None:
    assert tokenize("") == ()
    assert tokenize("abcd") == (int.from_bytes(b"abcd", "little"),)
    assert tokenize("abcde") == (int.from_bytes(b"abcd", "little"), ord("e"))
    assert len(tokenize("x" * 64)) == 16
    assert tokenize_bytes("é".encode()) == tokenize("é")


def test_render_chat_accepts_string_or_text_parts() -> None:
    as_string = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    as_parts = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    rendered = render_chat(as_string)
    assert rendered == render_chat(as_parts)
    assert rendered == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_next_turn_prompt_continues_previous_prompt_and_reply() -> None:
    first = [{"role": "user", "content": "question"}]
    reply = output_text(7)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    assert render_chat(second).startswith(render_chat(first) + reply)


@pytest.mark.parametrize("count", [0, 1, 9, 10, 11, 99, 100, 1234])
def test_output_bytes_len_matches_text(count: int) -> None:
    assert output_bytes_len(count) == len(output_text(count).encode())


def test_sequence_tail_is_the_tokenisation_of_prompt_plus_output() -> None:
    prompt = ("p" * 70).encode()
    full = tokenize_bytes(prompt + b"tok0 tok1 ")
    assert sequence_tail(tokenize_bytes(prompt), prompt, "tok0 tok1 ", 16) == full[16:]
    ids = (1, 2, 3)
    assert sequence_tail(ids, None, "tok0 ", 0) == ids + tokenize("tok0 ")


# --- chain hashing -----------------------------------------------------------------------
@pytest.mark.parametrize("shared", [0, 1, 15, 16, 17, 31, 32, 40, 64])
def test_shared_prefix_hits_whole_blocks_only(shared: int) -> None:
    first = tokens(0, shared) + tokens(10_000, 50)
    second = tokens(0, shared) + tokens(20_000, 50)
    cache = cache_holding(first)
    assert cache.lookup(cache.block_hashes(second), len(second)) == shared // BS * BS


def test_different_first_block_breaks_every_later_block() -> None:
    first = tokens(0, 64)
    second = [999_999, *first[1:]]  # only token 0 differs
    cache = cache_holding(first)
    assert cache.lookup(cache.block_hashes(second), len(second)) == 0


def test_hash_is_a_chain() -> None:
    hashes = hash_blocks(tokens(0, 48), BS)
    assert len(hashes) == 3
    assert hash_blocks(tokens(16, 32), BS, parent=hashes[0]) == hashes[1:]
    assert hash_blocks(tokens(16, 16), BS) != hashes[1:2]  # same tokens, other parent
    assert len(hash_blocks(tokens(0, 47), BS)) == 2  # partial block is not hashed


def test_salt_goes_into_the_first_block() -> None:
    prompt = tokens(0, 64)
    longer = [*prompt, *tokens(500, 20)]
    cache = cache_holding(prompt, salt="tenant-a")
    assert cache.lookup(cache.block_hashes(longer, salt="tenant-a"), len(longer)) == 64
    assert cache.lookup(cache.block_hashes(longer, salt="tenant-b"), len(longer)) == 0
    assert cache.lookup(cache.block_hashes(longer), len(longer)) == 0


def test_identical_prompt_recomputes_its_last_token() -> None:
    prompt = tokens(0, 32)  # exactly two blocks
    cache = cache_holding(prompt)
    # vLLM never serves the whole prompt from cache: the last block holding the final token
    # is computed again, so 16 of 32 are cached.
    assert cache.lookup(cache.block_hashes(prompt), len(prompt)) == 16
    one_more = [*prompt, 7]
    assert cache.lookup(cache.block_hashes(one_more), len(one_more)) == 32


def test_seed_changes_the_root() -> None:
    prompt = tokens(0, 32)
    assert PrefixCache(BS, 8, seed=1).block_hashes(prompt) != PrefixCache(
        BS, 8, seed=2
    ).block_hashes(prompt)


# --- eviction and pinning ----------------------------------------------------------------
def test_lru_eviction_under_small_capacity() -> None:
    cache = PrefixCache(BS, 4)
    a, b, c, d = (tokens(i * 1000, 32) for i in range(4))  # 2 blocks each

    def hold_and_release(prompt: list[int]) -> None:
        allocation = cache.allocate(cache.block_hashes(prompt), len(prompt))
        assert allocation is not None
        cache.release(allocation)

    def cached(prompt: list[int]) -> int:
        longer = [*prompt, 1]
        return cache.lookup(cache.block_hashes(longer), len(longer))

    hold_and_release(a)
    hold_and_release(b)
    assert (cached(a), cached(b)) == (32, 32)
    hold_and_release(c)  # full: evicts a, the least recently used
    assert (cached(a), cached(b), cached(c)) == (0, 32, 32)
    hold_and_release(b)  # touch b
    hold_and_release(d)  # evicts c now, not b
    assert (cached(b), cached(c), cached(d)) == (32, 0, 32)
    assert cache.cached_blocks == 4


def test_a_request_loses_its_last_block_first() -> None:
    cache = PrefixCache(BS, 3)
    a = tokens(0, 32)
    allocation = cache.allocate(cache.block_hashes(a), len(a))
    assert allocation is not None
    cache.release(allocation)
    for other in (tokens(5000, 16), tokens(6000, 16)):  # the second one needs an eviction
        held = cache.allocate(cache.block_hashes(other), len(other))
        assert held is not None
        cache.release(held)
    longer = [*a, 1]
    assert cache.lookup(cache.block_hashes(longer), len(longer)) == 16  # a's first block stays


def test_pinned_blocks_are_never_evicted() -> None:
    cache = PrefixCache(BS, 4)
    pinned = tokens(0, 32)
    held = cache.allocate(cache.block_hashes(pinned), len(pinned))
    assert held is not None
    assert cache.kv_usage() == 0.5
    free_one = tokens(1000, 32)
    released = cache.allocate(cache.block_hashes(free_one), len(free_one))
    assert released is not None
    cache.release(released)
    newcomer = tokens(2000, 32)
    assert (
        cache.allocate(cache.block_hashes(newcomer), len(newcomer)) is not None
    )  # evicts free_one
    longer = [*pinned, 1]
    assert cache.lookup(cache.block_hashes(longer), len(longer)) == 32
    # Now everything is pinned: a further request does not fit (it would wait).
    assert cache.allocate(cache.block_hashes(tokens(3000, 16)), 16) is None
    assert cache.kv_usage() == 1.0
    cache.release(held)
    assert cache.kv_usage() == 0.5


def test_force_overcommits_instead_of_refusing() -> None:
    cache = PrefixCache(BS, 2)
    big = tokens(0, 80)  # 5 blocks > capacity
    assert cache.allocate(cache.block_hashes(big), len(big)) is None
    allocation = cache.allocate(cache.block_hashes(big), len(big), force=True)
    assert allocation is not None
    assert cache.kv_usage() == 1.0
    cache.release(allocation)
    assert cache.pinned_blocks == 0
    assert cache.cached_blocks <= 5


def test_reserve_tokens_take_blocks_and_extra_hashes_become_cached() -> None:
    cache = PrefixCache(BS, 8)
    prompt = tokens(0, 20)  # 1 full block + partial
    hashes = cache.block_hashes(prompt)
    allocation = cache.allocate(hashes, len(prompt), reserve_tokens=30)  # ceil(50/16) = 4 blocks
    assert allocation is not None
    assert cache.pinned_blocks == 4
    continuation = tokens(16, 4) + tokens(7000, 40)  # from the block boundary on
    extra = cache.block_hashes(continuation, parent=hashes[-1])
    cache.release(allocation, extra)
    assert cache.pinned_blocks == 0
    whole = tokens(0, 16) + continuation + [5]
    assert cache.lookup(cache.block_hashes(whole), len(whole)) == 48


# --- counters ----------------------------------------------------------------------------
def test_counters_count_tokens_on_allocate_only() -> None:
    cache = PrefixCache(BS, 64)
    prompt = tokens(0, 40)
    hashes = cache.block_hashes(prompt)
    cache.lookup(hashes, len(prompt))
    assert (cache.queries, cache.hits) == (0, 0)
    first = cache.allocate(hashes, len(prompt))
    assert first is not None
    assert (first.cached_tokens, first.created_tokens) == (0, 32)
    cache.release(first)
    second = cache.allocate(hashes, len(prompt))
    assert second is not None
    assert (second.cached_tokens, second.created_tokens) == (32, 0)
    assert (cache.queries, cache.hits) == (80, 32)


def test_reset_drops_only_unpinned_blocks() -> None:
    cache = PrefixCache(BS, 64)
    held_prompt, free_prompt = tokens(0, 33), tokens(1000, 33)
    held = cache.allocate(cache.block_hashes(held_prompt), len(held_prompt))
    freed = cache.allocate(cache.block_hashes(free_prompt), len(free_prompt))
    assert held is not None
    assert freed is not None
    cache.release(freed)
    assert cache.reset() == 2
    assert cache.lookup(cache.block_hashes(free_prompt), len(free_prompt)) == 0
    assert cache.lookup(cache.block_hashes(held_prompt), len(held_prompt)) == 32
    cache.release(held)
    assert cache.lookup(cache.block_hashes(held_prompt), len(held_prompt)) == 32
