"""Causal GQA attention over the paged cache (kv_cache.py layout), in Triton.

decode (every sequence adds one token): flash-decoding. Each program takes one sequence, one kv head and one
  partition of the KV length; it serves all the query heads of that kv head, so K/V are read once. Partitions
  write a normalized partial output and its log-sum-exp, and a second kernel merges them. The partition count is
  picked to fill the GPU even at batch 1 with a long context; when it is 1 the first kernel writes the result.
prefill and mixed steps: one program per (query tile, sequence, query head) streams the sequence's cached keys
  (the prefix of earlier steps plus this step's tokens) with an online softmax; tiles wholly left of the diagonal
  skip the causal mask.
Softmax statistics and accumulators are fp32; P is rounded to the cache dtype before P @ V (as FlashAttention)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moerun.backends.base import AttentionMetadata
from moerun.backends.cuda.device import max_shared_memory
from moerun.backends.cuda.triton_utils import INTERPRETING, loop_bound, mma, next_pow2, to_dtype

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(q, m_i, l_i, acc, kv_base, tables_row, pos, lo, hi, scale_log2, block_size, stride_kv, stride_block,
                  stride_tok, d_ok, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Online-softmax update over cached keys lo..hi-1; CAUSAL masks keys after each row's position."""
    d = tl.arange(0, BLOCK_D)
    for n0 in range(loop_bound(lo), loop_bound(hi), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(tables_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
        offs = page * stride_block + (n % block_size) * stride_tok
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_base + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * scale_log2
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_base + stride_kv + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = mma(to_dtype(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_ptr, lse_ptr,
                   scale_log2, group, head_dim, block_size, part_len,
                   stride_qb, stride_qh, stride_kv, stride_block, stride_head, stride_tok, stride_tb,
                   stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                   FINAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * part_len
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    g_ok = g < group
    d_ok = d < head_dim
    if start >= seq_len:  # past this sequence's end (or a padded graph row of length 0)
        if FINAL:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:
            tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, tl.full([BLOCK_G], float("-inf"), tl.float32),
                     mask=g_ok)
        return
    end = tl.minimum(start + part_len, seq_len)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # A decode query sits after every cached key: no causal mask (pos is unused when CAUSAL is off).
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, cache_ptr + kv_head * stride_head, tables_ptr + b * stride_tb, g,
                                  start, end, scale_log2, block_size, stride_kv, stride_block, stride_tok, d_ok,
                                  CAUSAL=False, BLOCK_M=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    out = acc / l_i[:, None]
    if FINAL:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], to_dtype(out, out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    else:
        tl.store(part_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :], out,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit
def _decode_merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, head_dim,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials are summed CHUNK_S at a time: a whole [BLOCK_S, BLOCK_D] fp32 tile (hundreds of partitions at batch
    1) would not fit in registers."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # no live partition: a padded row, output 0
    total = tl.sum(tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    c = tl.arange(0, CHUNK_S)
    for s0 in range(0, loop_bound(num_splits), CHUNK_S):
        lse_c = tl.load(lse_row + s0 + c, mask=s0 + c < num_splits, other=float("-inf"))
        live = lse_c > float("-inf")
        w = tl.where(live, tl.exp2(lse_c - m), 0.0)
        parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + (s0 + c)[:, None] * stride_ps + d[None, :],
                        mask=live[:, None] & (d[None, :] < head_dim), other=0.0)
        acc += tl.sum(parts * w[:, None], axis=0)
    out = acc / tl.maximum(total, 1e-30)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, to_dtype(out, out_ptr.dtype.element_ty), mask=d < head_dim)


def plan_decode_splits(batch: int, kv_heads: int, len_bound: int, sms: int, block_n: int) -> tuple[int, int]:
    """(partition length, number of partitions): about two programs per SM, partitions of whole BLOCK_N tiles."""
    tiles = max(1, -(-len_bound // block_n))
    wanted = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    tiles_per_part = -(-tiles // min(wanted, tiles))
    part_len = tiles_per_part * block_n
    return part_len, -(-max(1, len_bound) // part_len)


def decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float, len_bound: int,
           sms: int) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence). len_bound: an upper bound of every seq_len that the host knows
    without reading the device (the longest sequence in eager mode, the block-table capacity under graph capture)."""
    batch, num_q, head_dim = q.shape
    kv_heads, block_size = cache.shape[2], cache.shape[3]
    group = num_q // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_n = 64 if head_dim <= 128 and q.element_size() <= 2 else 32  # fp32 tiles: half, to fit shared memory
    part_len, splits = plan_decode_splits(batch, kv_heads, len_bound, sms, block_n)
    final = splits == 1
    if final:
        part = lse = out  # unused
        part_strides = (0, 0, 0, 0, 0)
    else:
        part = torch.empty(batch, num_q, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_q, splits, dtype=torch.float32, device=q.device)
        part_strides = (part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1))
    tables = meta.block_tables
    _decode_kernel[(batch, kv_heads, splits)](
        q, cache, tables, meta.seq_lens, out, part, lse,
        scale * LOG2E, group, head_dim, block_size, part_len,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), tables.stride(0),
        out.stride(0), out.stride(1), *part_strides,
        FINAL=final, BLOCK_N=block_n, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=4, num_stages=2)
    if not final:
        _decode_merge_kernel[(batch, num_q)](
            part, lse, out, splits, head_dim, *part_strides, out.stride(0), out.stride(1),
            BLOCK_S=next_pow2(splits), CHUNK_S=min(next_pow2(splits), max(1, 4096 // next_pow2(head_dim))),
            BLOCK_D=next_pow2(head_dim), num_warps=4)
    return out


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, starts_ptr, out_ptr, scale_log2, group, head_dim,
                    block_size, stride_qt, stride_qh, stride_kv, stride_block, stride_head, stride_tok, stride_tb,
                    stride_ot, stride_oh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    q_start = tl.load(starts_ptr + b)
    q_len = tl.load(starts_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len  # keys cached by earlier steps
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_ok = rows < q_len
    d_ok = d < head_dim
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                other=0.0)
    pos = prefix + rows
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = cache_ptr + (h // group) * stride_head
    tables_row = tables_ptr + b * stride_tb
    # keys left of this tile's first row are visible to all its rows; then the diagonal band, masked
    diagonal = prefix + tile * BLOCK_M
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, kv_base, tables_row, pos, 0, diagonal, scale_log2, block_size,
                                  stride_kv, stride_block, stride_tok, d_ok, False, BLOCK_M, BLOCK_N, BLOCK_D)
    band_end = tl.minimum(seq_len, diagonal + BLOCK_M)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, kv_base, tables_row, pos, diagonal, band_end, scale_log2,
                                  block_size, stride_kv, stride_block, stride_tok, d_ok, True, BLOCK_M, BLOCK_N, BLOCK_D)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :], to_dtype(out, out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


PREFILL_STAGES = 2


def tile_smem(rows: int, block_n: int, head_dim: int, elem_bytes: int, stages: int) -> int:
    """Shared memory of an attention program: its Q tile and `stages` K and V tiles (sm_90 compiles of these
    kernels measured at most that)."""
    block_d = max(16, next_pow2(head_dim))
    return (rows + 2 * stages * block_n) * block_d * elem_bytes


def prefill_tiles(longest: int, head_dim: int, elem_bytes: int, smem_limit: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the prefill kernel. fp32 and head_dim > 128 tiles are twice the bytes: smaller; and
    narrower still where the device's shared memory per block is smaller than the tiles (fp32 with head_dim 256
    on a 99 KiB GPU), since Triton refuses such a launch."""
    wide = elem_bytes <= 2 and head_dim <= 128
    block_m = 128 if longest >= 128 and wide else 64
    block_n = 64 if wide else 32
    while tile_smem(block_m, block_n, head_dim, elem_bytes, PREFILL_STAGES) > smem_limit and block_m > 16:
        if block_n > 16:
            block_n //= 2
        else:
            block_m //= 2
    return block_m, block_n


def prefill(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] packed by meta.query_start_loc; any mix of new prompts, prompt chunks and decode tokens."""
    num_tokens, num_q, head_dim = q.shape
    kv_heads, block_size = cache.shape[2], cache.shape[3]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    longest = meta.max_query_len
    block_m, block_n = prefill_tiles(longest, head_dim, q.element_size(), max_shared_memory(q.device))
    if INTERPRETING:
        block_m = max(16, min(64, next_pow2(longest)))  # the interpreter's cost is per program: fewer, fuller tiles
    tables = meta.block_tables
    grid = (math.ceil(longest / block_m), meta.num_seqs, num_q)
    _prefill_kernel[grid](
        q, cache, tables, meta.seq_lens, meta.query_start_loc, out, scale * LOG2E, num_q // kv_heads, head_dim,
        block_size, q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=8 if block_m == 128 else 4, num_stages=PREFILL_STAGES)
    return out
