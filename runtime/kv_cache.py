"""The paged KV cache's storage: one tensor (or pair) per layer, in the backend's own layout. Which blocks belong
to which request is the block manager's business (runtime/block_manager.py)."""

from __future__ import annotations

from typing import Any

from moerun.backends.base import Backend
from moerun.runtime.memory import allocating, check_fits, count


def allocate_kv_caches(backend: Backend, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> list[Any]:
    """Checked against the free memory first (on Linux an oversized allocation usually succeeds and the process is
    killed when the pages are touched); an allocation that still fails is one line naming the layer and size."""
    per_layer = 2 * num_blocks * block_size * num_kv_heads * head_dim * backend.dtype.itemsize
    advice = f"lower kv_cache.num_blocks (now {num_blocks}) or load fewer layers"
    check_fits(f"the KV cache of {count(num_layers, 'layer')} ({num_blocks} blocks of {block_size} tokens)",
               num_layers * per_layer, backend, advice)
    caches = []
    for i in range(num_layers):
        with allocating(f"the KV cache of layer {i}", per_layer, backend.device, advice):
            caches.append(backend.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, backend.dtype))
    return caches
