"""The CUDA backend's paged KV cache: one tensor per layer, [2, num_blocks, kv_heads, block_size, head_dim].

Heads before tokens inside a block ("HND"): a decode program reads one kv head of one block as a single
contiguous run of block_size * head_dim elements. The graph never looks inside (its layout is ours)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.backends.cuda.triton_utils import next_pow2, rows_per_program, to_dtype


def allocate(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    return torch.zeros(2, num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device)


def to_reference_layout(cache: torch.Tensor) -> torch.Tensor:
    """The same cache in moerun.backends.cpu.ops' layout [2, num_blocks, block_size, kv_heads, head_dim] (tests)."""
    return cache.transpose(2, 3)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, num_tokens, num_heads, head_dim, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_kv, stride_block, stride_head, stride_tok,
                     ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    # negative slots are padding rows of a captured decode graph: nothing to store
    mask = (slot >= 0) & (h < num_heads) & (d < head_dim)
    dst = cache_ptr + (slot // block_size) * stride_block + h * stride_head + (slot % block_size) * stride_tok + d
    dtype = cache_ptr.dtype.element_ty
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, to_dtype(k, dtype), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + stride_kv, to_dtype(v, dtype), mask=mask)


def write(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at their cache slots (block * block_size + offset); slot -1 stores nothing."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    rows = rows_per_program(num_tokens)
    _write_kv_kernel[(triton.cdiv(num_tokens, rows),)](
        k, v, cache, slot_mapping, num_tokens, num_heads, head_dim, cache.shape[3],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        ROWS=rows, BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(head_dim), num_warps=4)
