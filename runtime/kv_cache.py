"""The paged KV cache's storage: one tensor (or pair) per layer, in the backend's own layout. Which blocks belong
to which request is the block manager's business (runtime/block_manager.py)."""

from __future__ import annotations

from typing import Any

from moerun.backends.base import Backend


def allocate_kv_caches(backend: Backend, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> list[Any]:
    return [backend.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, backend.dtype)
            for _ in range(num_layers)]
