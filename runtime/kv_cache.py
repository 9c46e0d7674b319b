"""The paged KV cache: per-layer storage owned by the backend (its layout is the backend's business) and the
block bookkeeping owned here: a free list of fixed-size blocks and a block table per sequence."""

from __future__ import annotations

from typing import Any

from moerun.backends.base import Backend
from moerun.backends.errors import MoerunError
from moerun.runtime.memory import allocating, check_fits, count


class PagedKVCache:
    def __init__(self, backend: Backend, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        per_layer = 2 * num_blocks * block_size * num_kv_heads * head_dim * backend.dtype.itemsize
        advice = f"lower kv_cache.num_blocks (now {num_blocks}) or load fewer layers"
        check_fits(f"the KV cache of {count(num_layers, 'layer')} ({num_blocks} blocks of {block_size} tokens)",
                   num_layers * per_layer, backend, advice)
        self.layers: list[Any] = []
        for i in range(num_layers):
            with allocating(f"the KV cache of layer {i}", per_layer, backend.device, advice):
                self.layers.append(backend.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim,
                                                             backend.dtype))
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend a sequence's block table so it covers num_tokens."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing > len(self._free):
            raise MoerunError(f"KV cache full: {missing} more blocks of {self.block_size} tokens needed, "
                              f"{len(self._free)} free of {self.num_blocks}; raise kv_cache.num_blocks")
        for _ in range(max(missing, 0)):
            block_table.append(self._free.pop())

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()
