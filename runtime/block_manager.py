"""Host-side ownership of the paged KV cache's blocks: a free list, reference counts, and prefix caching.

Prefix caching: once a block is full of computed tokens it is registered under a chained hash of its tokens
(sha256 of the parent block's hash and the block's token ids as int64 bytes: stable across processes and runs).
A new request whose prompt starts with the same full blocks reuses them (reference count + 1) and skips their
prefill. A freed block keeps its hash and contents and sits in the free queue, least recently freed first; it is
revived if a later request matches it before it is handed out again (then its hash is dropped). Each match is
also checked token by token, so a hash collision can never hand out another prompt's K/V. A request's last,
partial block is never registered, and at least one prompt token is always recomputed (its logits are needed).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from moerun.runtime.request import Request

ROOT_HASH = b"moerun-kv-prefix-v1"  # the parent of a sequence's first block


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(token_ids, dtype="<i8").tobytes()).digest()


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks  # the collision guard
        self._block_of: dict[bytes, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (some still hold a cached prefix that may be revived)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> tuple[list[int], list[bytes]]:
        """The cached blocks matching the longest run of request's leading full blocks, and their hashes."""
        if not self.enable_prefix_caching or request.wants_prompt_rows:
            return [], []
        tokens, size = request.token_ids, self.block_size
        blocks, hashes, parent = [], [], ROOT_HASH
        for i in range((len(tokens) - 1) // size):  # the last token is always recomputed
            chunk = tokens[i * size:(i + 1) * size]
            h = block_hash(parent, chunk)
            block = self._block_of.get(h)
            if block is None or self._tokens_of[block] != tuple(chunk):
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def allocate(self, request: Request, num_tokens: int, cached: tuple[list[int], list[bytes]] = ([], [])) -> bool:
        """Make request's blocks cover num_tokens, first taking the cached prefix blocks (for a request that holds
        none yet). False, with nothing changed, when the free blocks do not suffice."""
        cached_blocks, cached_hashes = cached
        held = len(request.block_ids) + len(cached_blocks)
        new = self.blocks_for(num_tokens) - held
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if max(new, 0) + revived > len(self._free):
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        request.block_ids.extend(cached_blocks)
        request.block_hashes.extend(cached_hashes)
        for _ in range(new):
            block, _ = self._free.popitem(last=False)  # the least recently freed
            self._forget(block)
            self.ref_counts[block] = 1
            request.block_ids.append(block)
        return True

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_stats.queries += num_tokens
        self.prefix_stats.hits += num_hit_tokens

    def free(self, request: Request) -> None:
        """Release request's blocks. Its tail blocks enter the free queue first and so are handed out again first:
        the head of a prompt is the part other requests most likely share."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
        request.block_ids.clear()
        request.block_hashes.clear()

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block of request that is now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for i in range(len(request.block_hashes), request.num_computed_tokens // size):
            chunk = request.token_ids[i * size:(i + 1) * size]
            h = block_hash(request.block_hashes[-1] if request.block_hashes else ROOT_HASH, chunk)
            request.block_hashes.append(h)
            block = request.block_ids[i]
            if h not in self._block_of:  # else another block already holds these tokens: keep that one
                self._block_of[h] = block
                self._hash_of[block] = h
                self._tokens_of[block] = tuple(chunk)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the blocks stay where they are)."""
        for block in range(self.num_blocks):
            self._forget(block)

    def _forget(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            if self._block_of.get(h) == block:
                del self._block_of[h]
            self._hash_of[block] = self._tokens_of[block] = None
