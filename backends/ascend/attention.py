"""Paged attention on Ascend: the cache layout, the cache write (npu_scatter_pa_kv_cache) and one fused attention
call (npu_fused_infer_attention_score) for prefill, decode and mixed batches alike.

Layout: per layer a K and a V cache of [num_blocks, block_size, kv_heads, D] (what npu_scatter_pa_kv_cache writes
in cache_mode "Norm"), viewed as [num_blocks, block_size, kv_heads * D] for FIA (the BnBsH paged layout).
Queries are packed TND [T, heads, D]; one FIA call covers the whole batch, as vllm-ascend does.

FIA's TND layout takes head dims 128 or 192 only (without rope). MiniMax-M2 has 128 and runs as is; a smaller
head dim is zero-padded: zeros add nothing to q.k, and the padded V columns give zero outputs that are cut off,
so the result is exact (the scale stays 1/sqrt(real head_dim)). Only toy models pay the extra cache memory.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch
import torch.nn.functional as F

from moerun.backends.ascend.model_limits import padded_head_dim
from moerun.backends.base import AttentionMetadata

# FIA's sparse_mode 3 (rightDownCausal: query i of a sequence with q_len new tokens and kv_len keys sees keys
# 0 .. i + kv_len - q_len) reads this compressed mask: 1 = not attended, strictly above the diagonal.
COMPRESSED_MASK_SIZE = 2048
RIGHT_DOWN_CAUSAL = 3


@dataclasses.dataclass
class PagedKV:
    key: torch.Tensor  # [num_blocks, block_size, kv_heads, padded_dim]
    value: torch.Tensor
    head_dim: int  # the model's; the cache holds padded_dim >= head_dim

    @property
    def padded_dim(self) -> int:
        return self.key.shape[-1]


def allocate(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> PagedKV:
    shape = (num_blocks, block_size, num_kv_heads, padded_head_dim(head_dim))
    key, value = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
    return PagedKV(key, value, head_dim)


def causal_mask(device: torch.device) -> torch.Tensor:
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.int8, device=device)
    return torch.triu(ones, diagonal=1)


def _pad(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def write_kv(ops: ModuleType, cache: PagedKV, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """k, v [T, kv_heads, head_dim] into their slots (block * block_size + offset)."""
    dim = cache.padded_dim
    k = _pad(k, dim).to(cache.key.dtype).contiguous()
    v = _pad(v, dim).to(cache.value.dtype).contiguous()
    # cache_mode "Norm": ND caches. The default, "PA_NZ", expects FRACTAL_NZ caches and would scramble these.
    ops.npu_scatter_pa_kv_cache(k, v, cache.key, cache.value, meta.slot_mapping.contiguous(), cache_mode="Norm")


def attention(ops: ModuleType, q: torch.Tensor, cache: PagedKV, meta: AttentionMetadata, scale: float,
              mask: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of packed queries q [T, heads, head_dim] over the paged cache -> [T, heads, head_dim]."""
    num_blocks, block_size, kv_heads, dim = cache.key.shape
    out, _ = ops.npu_fused_infer_attention_score(
        _pad(q, dim).contiguous(),
        cache.key.view(num_blocks, block_size, kv_heads * dim),
        cache.value.view(num_blocks, block_size, kv_heads * dim),
        atten_mask=mask,
        actual_seq_lengths=meta.query_start_loc_host[1:],  # TND: the query lengths are cumulative ...
        actual_seq_lengths_kv=list(meta.seq_lens_host),  # ... but with a block table the KV lengths are per request
        block_table=meta.block_tables,
        num_heads=q.shape[1],
        num_key_value_heads=kv_heads,
        scale=float(scale),  # the kernel's default is 1.0, not 1/sqrt(D): always pass it
        input_layout="TND",
        sparse_mode=RIGHT_DOWN_CAUSAL,
        block_size=block_size,
    )
    return out[..., :cache.head_dim]
