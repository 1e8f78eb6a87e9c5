"""Prefix cache of the simulated engine: vLLM's automatic prefix caching, sans-IO.

Only full blocks of `block_size` tokens are cached. A block's hash chains its parent's hash with
its tokens (the first block chains from a per-cache root and carries the `cache_salt`), so a match
is token-exact from token 0. Blocks of running requests are pinned; unreferenced blocks stay
cached in LRU order until an allocation needs their room. As in vLLM, a request's blocks are
freed tail first (its longest prefix is evicted first), the cache hit never covers the last
prompt token (it must be computed), and `queries`/`hits` count tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = int


def hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    *,
    root: BlockHash = 0,
    parent: BlockHash | None = None,
    salt: str | None = None,
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `tokens` (a trailing partial block is ignored).

    Without `parent` the chain starts at `root` and the first block carries `salt`; with one,
    the tokens continue an earlier chain.
    """
    hashes: list[BlockHash] = []
    previous = parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tuple(tokens[start : start + block_size])
        previous = hash((root, block, salt)) if previous is None else hash((previous, block))
        hashes.append(previous)
    return hashes


@dataclass(frozen=True, slots=True)
class Allocation:
    """The blocks one request holds: hashed prompt blocks plus unhashed ones for the rest."""

    hashes: tuple[BlockHash, ...]
    anonymous_blocks: int
    cached_tokens: int
    created_tokens: int


class PrefixCache:
    """Block pool with a hash index, pinning by reference count and LRU eviction."""

    def __init__(self, block_size: int, capacity_blocks: int, *, seed: int = 0) -> None:
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError("block_size and capacity_blocks must be >= 1")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.root: BlockHash = hash(("kvroute-simulator", seed))
        self.queries = 0
        self.hits = 0
        self._refs: dict[BlockHash, int] = {}
        self._free: OrderedDict[BlockHash, None] = OrderedDict()  # ref 0, oldest first
        self._pinned_hashed = 0
        self._pinned_anonymous = 0

    # --- queries -------------------------------------------------------------------------
    def block_hashes(
        self, tokens: Sequence[int], *, salt: str | None = None, parent: BlockHash | None = None
    ) -> list[BlockHash]:
        return hash_blocks(tokens, self.block_size, root=self.root, parent=parent, salt=salt)

    def lookup(self, hashes: Sequence[BlockHash], num_tokens: int) -> int:
        """Prompt tokens a request would find cached now; changes nothing, counts nothing."""
        return self._hit_blocks(hashes, num_tokens) * self.block_size

    def kv_usage(self) -> float:
        """Pinned blocks / capacity, like `vllm:kv_cache_usage_perc` (cached-but-free excluded)."""
        return min(1.0, self.pinned_blocks / self.capacity_blocks)

    @property
    def pinned_blocks(self) -> int:
        return self._pinned_hashed + self._pinned_anonymous

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a hash, pinned or not."""
        return len(self._refs)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take now: empty ones plus evictable cached ones."""
        return self.capacity_blocks - self.pinned_blocks

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._refs

    # --- changes -------------------------------------------------------------------------
    def allocate(
        self,
        hashes: Sequence[BlockHash],
        num_tokens: int,
        *,
        reserve_tokens: int = 0,
        force: bool = False,
    ) -> Allocation | None:
        """Pin the blocks for a prompt of `num_tokens` tokens plus `reserve_tokens` more.

        `hashes` are the prompt's full-block hashes. Returns None (and changes nothing) when
        the blocks do not fit; with `force` it overcommits instead (a lone request must run).
        Counts the prompt in `queries` and its cached part in `hits`.
        """
        hit = self._hit_blocks(hashes, num_tokens)
        total_blocks = -(-(num_tokens + reserve_tokens) // self.block_size)
        anonymous = max(0, total_blocks - len(hashes))
        reused_free = 0
        new_hashed = 0
        for block_hash in hashes:
            refs = self._refs.get(block_hash)
            if refs is None:
                new_hashed += 1
            elif refs == 0:
                reused_free += 1
        needed = new_hashed + anonymous + reused_free
        if needed > self.free_blocks and not force:
            return None

        for block_hash in hashes:
            refs = self._refs.get(block_hash)
            if refs == 0:
                del self._free[block_hash]
                self._refs[block_hash] = 1
                self._pinned_hashed += 1
            elif refs is not None:
                self._refs[block_hash] = refs + 1
        # Room for the new blocks: empty ones first, then the least recently used cached ones.
        empty = self.capacity_blocks - self.pinned_blocks - len(self._free)
        self._evict(new_hashed + anonymous - empty)
        for block_hash in hashes:
            if block_hash not in self._refs:
                self._refs[block_hash] = 1
                self._pinned_hashed += 1
        self._pinned_anonymous += anonymous

        cached_tokens = hit * self.block_size
        self.queries += num_tokens
        self.hits += cached_tokens
        return Allocation(
            hashes=tuple(hashes),
            anonymous_blocks=anonymous,
            cached_tokens=cached_tokens,
            created_tokens=(len(hashes) - hit) * self.block_size,
        )

    def release(self, allocation: Allocation, extra_hashes: Sequence[BlockHash] = ()) -> None:
        """Unpin a request's blocks; unreferenced ones stay cached in LRU order.

        `extra_hashes` are full blocks written after the prompt (the generated text); they are
        kept in the request's unhashed blocks, as many as it holds.
        """
        self._pinned_anonymous -= allocation.anonymous_blocks
        kept: list[BlockHash] = []
        room = self.capacity_blocks - self.pinned_blocks - len(self._free)
        for block_hash in extra_hashes[: allocation.anonymous_blocks]:
            if len(kept) >= room:
                break
            if block_hash not in self._refs:
                self._refs[block_hash] = 0
                kept.append(block_hash)
        freed: list[BlockHash] = []
        for block_hash in allocation.hashes:
            refs = self._refs.get(block_hash)
            if refs is None or refs == 0:
                continue  # cleared by reset() while pinned
            self._refs[block_hash] = refs - 1
            if refs == 1:
                self._pinned_hashed -= 1
                freed.append(block_hash)
        # Tail first: the request's last block becomes the next to evict.
        for block_hash in reversed(freed + kept):
            self._free[block_hash] = None

    def reset(self) -> int:
        """Drop every unpinned cached block (vLLM's /reset_prefix_cache); returns how many."""
        dropped = len(self._free)
        for block_hash in self._free:
            del self._refs[block_hash]
        self._free.clear()
        return dropped

    # --- internals -----------------------------------------------------------------------
    def _hit_blocks(self, hashes: Sequence[BlockHash], num_tokens: int) -> int:
        limit = min(len(hashes), max(0, num_tokens - 1) // self.block_size)
        hit = 0
        while hit < limit and hashes[hit] in self._refs:
            hit += 1
        return hit

    def _evict(self, count: int) -> None:
        for _ in range(min(count, len(self._free))):
            block_hash, _ = self._free.popitem(last=False)
            del self._refs[block_hash]
