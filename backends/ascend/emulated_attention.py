"""CPU emulation of torch_npu's paged-attention ops: npu_fused_infer_attention_score (FIA) and
npu_scatter_pa_kv_cache. Same names, signatures, defaults, layouts and outputs as torch_npu 2.13.

Sources of the semantics and limits (op-plugin docs/zh/custom_APIs/torch_npu/, the torch_npu 2.13 docstrings):
FIA computes softmax(scale * Q K^T + mask) V; the scale defaults to 1.0, not 1/sqrt(D). Only what moerun calls is
emulated: the TND layout (packed varlen queries), with or without a paged cache, sparse_mode 0 (no mask),
2 (leftUpCausal) and 3 (rightDownCausal) with the compressed 2048x2048 mask, optional softmax_lse.

Deliberate deviation: the A2/A3 kernel takes float16/bfloat16 only. The emulation also accepts float32, so that
moerun's index and layout logic can be checked without bf16 rounding noise; AscendBackend.check_model refuses
float32 on a real NPU.
"""

from __future__ import annotations

import functools
import math

import torch

from moerun.backends.ascend.emulated_checks import (
    not_emulated, reject_given, require, require_contiguous, require_dtype, undefined_like)

FIA = "npu_fused_infer_attention_score"
SCATTER = "npu_scatter_pa_kv_cache"

HARDWARE_QUERY_DTYPES = (torch.float16, torch.bfloat16)
EMULATED_QUERY_DTYPES = HARDWARE_QUERY_DTYPES + (torch.float32,)  # the one widening, see the module docstring
KNOWN_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND", "TND_NTD", "NTD_TND")
MASKED_SPARSE_MODES = (2, 3, 4)  # these take the compressed (2048, 2048) mask
COMPRESSED_MASK = 2048
MAX_HEADS = 256
MAX_GQA_RATIO = 64
MAX_TND_BATCH = 4096


def npu_fused_infer_attention_score(
        query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
        dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
        antiquant_scale=None, antiquant_offset=None, block_table=None, query_padding_size=None,
        kv_padding_size=None, key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
        value_antiquant_offset=None, key_shared_prefix=None, value_shared_prefix=None,
        actual_shared_prefix_len=None, query_rope=None, key_rope=None, key_rope_antiquant_scale=None,
        num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
        num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0, antiquant_mode=0,
        softmax_lse_flag=False, key_antiquant_mode=0, value_antiquant_mode=0):
    """-> (attention_out like query, softmax_lse (T, N, 1) fp32 if softmax_lse_flag else a (1,) zero)."""
    reject_given(FIA, pse_shift=pse_shift, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
                 dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2,
                 antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                 query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                 key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
                 value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
                 key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                 actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
                 key_rope_antiquant_scale=key_rope_antiquant_scale)
    require(input_layout in KNOWN_LAYOUTS, FIA,
            f"input_layout {input_layout!r} is unknown ({', '.join(KNOWN_LAYOUTS)})")
    if input_layout != "TND":
        not_emulated(FIA, f"input_layout {input_layout!r}")

    # ---- query, heads, head dim ----
    require(query.dim() == 3, FIA, f"TND query must be (T, N, D), got shape {tuple(query.shape)}")
    require_dtype(query, EMULATED_QUERY_DTYPES, FIA, "query")
    require_contiguous(query, FIA, "query")
    total_q, heads, dim = query.shape
    require(num_heads == heads, FIA, f"num_heads {num_heads} differs from the query's N axis {heads}")
    kv_heads = num_key_value_heads or num_heads  # 0 means MHA
    require(heads <= MAX_HEADS and kv_heads <= MAX_HEADS, FIA, f"N <= {MAX_HEADS} (got {heads} / {kv_heads} KV heads)")
    require(heads % kv_heads == 0, FIA, f"num_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    require(heads // kv_heads <= MAX_GQA_RATIO, FIA, f"num_heads / num_key_value_heads must be <= {MAX_GQA_RATIO}")
    # TND without rope on A2/A3: Q_D = K_D = V_D = 128, or Q_D = K_D = 192 (V_D 128/192); D = 512 is MLA only.
    require(dim in (128, 192), FIA, f"TND layout without query_rope needs head dim 128 or 192, got {dim}")

    # ---- lengths: TND needs both lists; query lengths are cumulative ----
    require(actual_seq_lengths is not None and actual_seq_lengths_kv is not None, FIA,
            "TND layout requires actual_seq_lengths and actual_seq_lengths_kv")
    q_ends = [int(v) for v in actual_seq_lengths]
    batch = len(q_ends)
    require(0 < batch <= MAX_TND_BATCH, FIA, f"actual_seq_lengths must hold 1..{MAX_TND_BATCH} entries (the batch)")
    require(all(v >= 0 for v in q_ends) and all(b >= a for a, b in zip(q_ends, q_ends[1:])), FIA,
            f"actual_seq_lengths must be cumulative (non-negative, non-decreasing), got {q_ends}")
    require(q_ends[-1] <= total_q, FIA, f"actual_seq_lengths ends at {q_ends[-1]} beyond the {total_q} query rows")
    q_lens = [b - a for a, b in zip([0] + q_ends, q_ends)]
    kv_lens_given = [int(v) for v in actual_seq_lengths_kv]
    require(len(kv_lens_given) == batch, FIA,
            f"actual_seq_lengths_kv has {len(kv_lens_given)} entries, the batch is {batch}")

    # ---- K/V: a paged cache (block_table given) or packed TND ----
    require(key.shape == value.shape, FIA, f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    require(key.dtype == query.dtype and value.dtype == query.dtype, FIA, "key/value dtype must equal the query's")
    if block_table is not None:
        k_of, v_of, kv_lens = _paged_kv(key, value, block_table, block_size, kv_lens_given, batch, kv_heads, dim,
                                        max(q_lens))
    else:
        k_of, v_of, kv_lens = _packed_kv(key, value, kv_lens_given, kv_heads, dim)

    # ---- mask ----
    require(sparse_mode in (0, 1, 2, 3, 4), FIA, f"sparse_mode {sparse_mode} is not supported (0, 1, 2, 3, 4)")
    if sparse_mode in (1, 4):
        not_emulated(FIA, f"sparse_mode {sparse_mode}")
    if sparse_mode == 0 and atten_mask is not None:
        not_emulated(FIA, "sparse_mode 0 with an explicit atten_mask")
    if sparse_mode in MASKED_SPARSE_MODES:
        _check_compressed_mask(atten_mask, sparse_mode)
    require(inner_precise in (0, 1, 2, 3), FIA, f"inner_precise {inner_precise} is not 0..3")
    if max(q_lens) <= 1:
        require(inner_precise in (0, 1), FIA, "decode (query length 1) supports inner_precise 0 and 1 only")

    out = undefined_like(tuple(query.shape), query.dtype, query.device)  # rows past the last length stay unwritten
    lse = undefined_like((total_q, heads, 1), torch.float32, query.device)
    for b in range(batch):
        start, q_len = q_ends[b] - q_lens[b], q_lens[b]
        if q_len:
            rows = slice(start, start + q_len)
            out[rows], lse[rows, :, 0] = _attend(query[rows], k_of(b), v_of(b), scale, sparse_mode)
    if not softmax_lse_flag:
        lse = torch.zeros(1, dtype=torch.float32, device=query.device)
    return out, lse


def _attend(q, k, v, scale, sparse_mode):
    """One sequence, in fp32: q [q_len, N, D] over k, v [kv_len, KV_N, D] -> (out like q, lse [q_len, N])."""
    q_len, kv_len, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # query head h reads KV head h // group
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(q_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    if sparse_mode == 3:  # causal aligned to the bottom-right corner: query i sees keys <= i + kv_len - q_len
        scores = scores.masked_fill(k_pos > q_pos + (kv_len - q_len), float("-inf"))
    elif sparse_mode == 2:  # causal aligned to the top-left corner
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # [N, q_len]; -inf for a fully masked row
    probs = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)  # fully masked rows give 0 ("invalid rows")
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype), row_lse.transpose(0, 1)


def _paged_kv(key, value, block_table, block_size, kv_lens, batch, kv_heads, dim, max_q_len):
    """Page-attention reads: per-request KV lengths (not cumulative), K/V gathered through the block table."""
    require(block_table.dtype == torch.int32 and block_table.dim() == 2, FIA,
            "block_table must be int32 [B, max_blocks]")
    require(block_table.shape[0] == batch, FIA, f"block_table has {block_table.shape[0]} rows, the batch is {batch}")
    require(isinstance(block_size, int) and block_size > 0, FIA, "page attention needs block_size > 0")
    # TND + page attention (D != 512): a multiple of 16, at most 1024; prefill (Q_S > 1): 128..512, multiple of
    # 128; decode: up to 512.
    require(block_size % 16 == 0 and block_size <= 1024, FIA,
            f"block_size {block_size} must be a multiple of 16, <= 1024 (TND)")
    if max_q_len > 1:
        require(block_size % 128 == 0 and 128 <= block_size <= 512, FIA,
                f"block_size {block_size} must be a multiple of 128 in [128, 512] when a query has more than one token")
    else:
        require(block_size <= 512, FIA, f"block_size {block_size} must be <= 512")
    if key.dim() == 4:  # BnNBsD (num_blocks, KV_N, block_size, D): valid for TND, but moerun uses BnBsH
        not_emulated(FIA, "the (blocks, KV_N, block_size, D) paged layout")
    require(key.dim() == 3, FIA, f"a paged key/value is (blocks, block_size, KV_N * D), got shape {tuple(key.shape)}")
    num_blocks, bs, width = key.shape
    # (H <= 65535 for this layout always holds here: at most 256 KV heads of at most 192 dims.)
    require(width == kv_heads * dim, FIA, f"cache width {width} != num_key_value_heads {kv_heads} x D {dim}")
    require(bs == block_size, FIA, f"cache block size {bs} != block_size {block_size}")
    capacity = block_table.shape[1] * block_size
    require(all(0 <= n <= capacity for n in kv_lens), FIA,
            f"with a block_table, actual_seq_lengths_kv holds each request's own KV length (<= {capacity}), "
            f"got {kv_lens}")
    blocks_used = [math.ceil(n / block_size) for n in kv_lens]
    require(num_blocks >= sum(blocks_used), FIA, f"{num_blocks} cache blocks < the {sum(blocks_used)} the batch uses")
    for b, used in enumerate(blocks_used):
        ids = block_table[b, :used]
        # The kernel does not validate block ids ("garbage in, garbage out"); the emulation refuses them.
        require(bool(((ids >= 0) & (ids < num_blocks)).all()), FIA,
                f"block_table row {b} points outside the {num_blocks} blocks")

    def read(cache):
        return lambda b: cache[block_table[b, :blocks_used[b]].long()].reshape(-1, kv_heads, dim)[:kv_lens[b]]

    return read(key), read(value), kv_lens


def _packed_kv(key, value, kv_ends, kv_heads, dim):
    """No block table: K/V packed like the query, (T_kv, KV_N, D), with cumulative KV lengths."""
    require(key.dim() == 3 and key.shape[1:] == (kv_heads, dim), FIA, f"TND key must be (T, {kv_heads}, {dim})")
    require(all(b >= a for a, b in zip([0] + kv_ends, kv_ends)), FIA,
            f"without a block_table, actual_seq_lengths_kv must be cumulative, got {kv_ends}")
    require(kv_ends[-1] <= key.shape[0], FIA, f"actual_seq_lengths_kv ends at {kv_ends[-1]} beyond {key.shape[0]} rows")
    starts = [0] + kv_ends[:-1]
    lens = [e - s for s, e in zip(starts, kv_ends)]
    return (lambda b: key[starts[b]:kv_ends[b]]), (lambda b: value[starts[b]:kv_ends[b]]), lens


def _check_compressed_mask(mask, sparse_mode):
    require(mask is not None, FIA, f"sparse_mode {sparse_mode} requires the compressed atten_mask")
    require(mask.dtype in (torch.bool, torch.int8, torch.uint8), FIA, "atten_mask dtype must be bool, int8 or uint8")
    shapes = [(COMPRESSED_MASK,) * 2, (1,) + (COMPRESSED_MASK,) * 2, (1, 1) + (COMPRESSED_MASK,) * 2]
    require(tuple(mask.shape) in shapes, FIA,
            f"sparse_mode {sparse_mode} needs a (2048, 2048) mask, got {tuple(mask.shape)}")
    # The kernel trusts the caller to pass the triangular mask (1 = not attended, above the diagonal); any other
    # content silently gives wrong attention on the NPU, so the emulation checks it.
    require(torch.equal(mask.reshape(COMPRESSED_MASK, COMPRESSED_MASK).bool(), _upper_triangle(mask.device)), FIA,
            "the compressed mask must be 1 strictly above the diagonal and 0 elsewhere (torch.triu(ones, 1))")


@functools.lru_cache(maxsize=4)
def _upper_triangle(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=device), diagonal=1)


def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    """In place: key_cache/value_cache at slot s (= block * block_size + offset) <- key/value of that token."""
    reject_given(SCATTER, compress_lens=compress_lens, compress_seq_offsets=compress_seq_offsets, seq_lens=seq_lens)
    require(cache_mode in (None, "Norm", "PA_NZ"), SCATTER, f"cache_mode {cache_mode!r} is unknown (Norm, PA_NZ)")
    if cache_mode == "PA_NZ":
        # The default. It expects FRACTAL_NZ caches (blocks, N*D/16, block_size, 16), so an ND cache written in
        # this mode is laid out wrongly. moerun passes cache_mode="Norm".
        not_emulated(SCATTER, "cache_mode 'PA_NZ' (the default: NZ-format caches)")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        require_contiguous(t, SCATTER, name)
    require(key.dim() == 3 and value.dim() == 3, SCATTER,
            "key/value must be [tokens, heads, head_size] (4-D is the compress scenario)")
    require(key.shape[:2] == value.shape[:2], SCATTER, "key and value must agree on [tokens, heads]")
    require(key_cache.dim() == 4 and value_cache.dim() == 4, SCATTER,
            "caches must be 4-D: [blocks, block_size, heads, head_size]")
    require(key.dtype == value.dtype == key_cache.dtype == value_cache.dtype, SCATTER,
            "key, value and both caches must share one dtype")
    require(key_cache.shape[2:] == key.shape[1:] and value_cache.shape[2:] == value.shape[1:], SCATTER,
            f"Norm caches are [blocks, block_size, {key.shape[1]}, head_size]: got {tuple(key_cache.shape)}")
    require(key_cache.shape[:2] == value_cache.shape[:2], SCATTER, "key_cache and value_cache block shapes differ")
    require_dtype(slot_mapping, (torch.int32, torch.int64), SCATTER, "slot_mapping")
    require(slot_mapping.shape == (key.shape[0],), SCATTER, "slot_mapping must hold one slot per token")
    slots = key_cache.shape[0] * key_cache.shape[1]
    require(bool(((slot_mapping >= 0) & (slot_mapping < slots)).all()), SCATTER, f"slots must lie in [0, {slots - 1}]")
    require(slot_mapping.unique().numel() == slot_mapping.numel(), SCATTER,
            "slots must be unique (duplicates are undefined)")
    index = slot_mapping.long()
    key_cache.view(slots, *key.shape[1:])[index] = key
    value_cache.view(slots, *value.shape[1:])[index] = value
