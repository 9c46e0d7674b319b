"""Reference implementations of every backend op, in plain PyTorch.

Written for clarity and exactness first: statistics, softmax and the expert combine run in fp32 (in float64 when
the model runs in float64, as a high-precision reference does), and each op follows the MiniMax-M2 math of
transformers' MiniMaxM2ForCausalLM. Other backends' tests call these functions
directly as their oracle, so they take plain tensors (no backend state) and work on any device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and accumulations: fp32, or the input's own where it is finer (float64)."""
    return torch.promote_types(dtype, torch.float32)


# Rows of a stored-narrower weight widened at a time by `linear` (bounds the scratch to ~64 MB at M2's hidden size).
_WIDEN_ROWS = 4096


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ w^T. A weight held narrower than x (cpu `weights: checkpoint`) is widened a block of rows at a
    time: the same products as a weight converted at load, without a full-width copy of a 200k-row lm_head."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    return torch.cat([F.linear(x, w[i:i + _WIDEN_ROWS].to(x.dtype)) for i in range(0, w.shape[0], _WIDEN_ROWS)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalize in fp32, cast back to the input dtype, then scale by the weight.
    xf = x.to(wide(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX (rotate-half) rotary on the first rotary_dim = cos.shape[-1] dims; element i pairs with i + rotary_dim/2."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads

    def apply(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    return apply(q), apply(k)


# ---- paged KV cache: one tensor per layer, [2, num_blocks, block_size, kv_heads, head_dim] ------------------------

def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    kv_cache[0].view(num_blocks * block_size, heads, dim)[slot_mapping] = k.to(kv_cache.dtype)
    kv_cache[1].view(num_blocks * block_size, heads, dim)[slot_mapping] = v.to(kv_cache.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionGroup:
    """Sequences of one step attended together in one padded SDPA call: [b, Qmax] queries over [b, S] keys."""

    query_rows: torch.Tensor  # int64 [b, Qmax]: packed row of each padded query (padding repeats the last row)
    valid: torch.Tensor  # bool [b, Qmax]: False on padding
    key_slots: torch.Tensor  # int64 [b * S]: cache slot of each key (S covers whole blocks)
    mask: torch.Tensor  # [b, 1, Qmax, S] added to the scores: 0 where attended (causal, in the sequence), -inf else
    # Where each layer gathers the group's K and V [b, S, Hkv, D]: allocated once per step, not once per layer
    # (a fresh allocation of this size is fresh pages from the OS, whose first touch costs more than the copy).
    keys: torch.Tensor
    values: torch.Tensor


def attention_plan(query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor,
                   kv_cache: torch.Tensor, dtype: torch.dtype) -> list[AttentionGroup]:
    """The index tensors, masks and gather buffers of one step's attention, the same in every layer: built once per
    step. The mask is additive in the query dtype (SDPA would convert a boolean one on every call).

    Decode rows (one new token) and prefill rows (several) form separate groups, so a long prompt chunk does not
    pad every decode row of a mixed batch to its length."""
    device = block_tables.device
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    bounds = torch.tensor(query_start_loc, dtype=torch.int64, device=device)
    starts, q_lens = bounds[:-1], bounds[1:] - bounds[:-1]
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    groups = []
    for members in (q_lens == 1, q_lens > 1):
        seqs = members.nonzero().squeeze(1)
        if seqs.numel() == 0:
            continue
        q_len, seq_len = q_lens[seqs, None], lens[seqs, None]
        width = -(-int(seq_len.max()) // block_size)
        offset = torch.arange(int(q_len.max()), device=device)[None, :]
        last = torch.minimum(offset, q_len - 1)
        position = seq_len - q_len + last  # each query's position; a padded row copies its sequence's last one
        hidden = torch.arange(width * block_size, device=device)[None, None, :] > position[:, :, None]
        slots = block_tables[seqs, :width].long()[:, :, None] * block_size + torch.arange(block_size, device=device)
        gathered = (len(seqs), width * block_size, kv_heads, head_dim)
        groups.append(AttentionGroup(
            query_rows=starts[seqs, None] + last, valid=offset < q_len, key_slots=slots.flatten(),
            mask=torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, -math.inf)[:, None],
            keys=kv_cache.new_empty(gathered), values=kv_cache.new_empty(gathered)))
    return groups


def attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
              block_tables: torch.Tensor, scale: float, plan: list[AttentionGroup] | None = None) -> torch.Tensor:
    """Causal GQA attention over the paged cache. Query i of a sequence with q_len new tokens sits at position
    seq_len - q_len + i and sees keys 0..that position. Each group's K/V pages are gathered in the cache dtype
    and attended in one scaled_dot_product_attention call (fp32 softmax and accumulation inside); query head h
    reads KV head h // (Hq / Hkv), and K/V are never repeated per query head."""
    num_tokens, num_heads, head_dim = q.shape
    _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
    if plan is None:
        plan = attention_plan(query_start_loc, seq_lens, block_tables, kv_cache, q.dtype)
    keys = kv_cache[0].view(num_blocks * block_size, kv_heads, head_dim)
    values = kv_cache[1].view(num_blocks * block_size, kv_heads, head_dim)
    out = torch.empty_like(q)
    for g in plan:
        b, q_max = g.query_rows.shape
        torch.index_select(keys, 0, g.key_slots, out=g.keys.view(-1, kv_heads, head_dim))
        torch.index_select(values, 0, g.key_slots, out=g.values.view(-1, kv_heads, head_dim))
        k, v = g.keys.transpose(1, 2).to(q.dtype), g.values.transpose(1, 2).to(q.dtype)  # [b, Hkv, S, D]
        if q_max == 1:
            # One query per sequence: the query heads sharing a KV head become that head's rows [b, Hkv, g, D]
            # (faster than SDPA's GQA path for a single query); the mask broadcasts over them.
            rows = g.query_rows[:, 0]
            o = F.scaled_dot_product_attention(q[rows].view(b, kv_heads, num_heads // kv_heads, head_dim), k, v,
                                               attn_mask=g.mask, scale=scale)
            out[rows] = o.reshape(b, num_heads, head_dim)
        else:
            o = F.scaled_dot_product_attention(q[g.query_rows].transpose(1, 2), k, v, attn_mask=g.mask, scale=scale,
                                               enable_gqa=True)  # [b, Hq, Qmax, D]
            out[g.query_rows[g.valid]] = o.transpose(1, 2)[g.valid]
    return out


# ---- MoE ----------------------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; the correction bias only chooses the experts; weights are the chosen unbiased scores,
    renormalized to sum 1. All in fp32: bf16 here flips expert choices."""
    scores = torch.sigmoid(router_logits.to(wide(router_logits.dtype)))
    ids = torch.topk(scores + bias.to(scores.dtype), top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """Routed SwiGLU experts: two grouped matmuls (one group per expert, pairs in expert order) run every
    expert's tokens in one call each, rounding as one linear per expert would. The stacks hold experts
    first_expert.. of the layer (expert parallelism); pairs routed to other experts are skipped. A float64 run, or
    a stack held narrower than x (cpu `weights: checkpoint`), which torch's grouped matmul takes neither of, runs
    expert by expert, each expert's weights widened as it runs (the same products)."""
    inter, local_ids = w2.shape[-1], ids - first_expert
    if x.dtype == w13.dtype and x.dtype in _GROUPED_MM_DTYPES:
        pairs = _ExpertPairs.of(local_ids, w13.shape[0])
        gate_up = _grouped_linear(x[pairs.token], w13, pairs.ends)
        y = _grouped_linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2, pairs.ends)
        return pairs.combine(y, weights, x.dtype)

    def expert_out(expert: int, tokens: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x[tokens], w13[expert].to(x.dtype))
        return F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[expert].to(x.dtype))

    return routed_sum(x, weights, local_ids, w13.shape[0], expert_out)


def routed_sum(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
               expert_out: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[t, j] * expert_out(ids[t, j], ...)[t] -> [T, H] in x's dtype, for experts without a grouped
    matmul: expert_out(e, tokens) runs expert e on all its tokens at once and returns their outputs."""
    pairs = _ExpertPairs.of(ids, num_experts)
    bounds = [0, *pairs.ends.tolist()]
    outs = [expert_out(e, pairs.token[bounds[e]:bounds[e + 1]]) for e in range(num_experts)
            if bounds[e + 1] > bounds[e]]
    # No pairs at all when every token chose experts another rank holds.
    y = torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])
    return pairs.combine(y, weights, x.dtype)


@dataclasses.dataclass(frozen=True)
class _ExpertPairs:
    """The token-expert pairs of a routing, sorted by expert once."""

    order: torch.Tensor  # int64 [T * k]: pair index (t * k + j) of each sorted position
    token: torch.Tensor  # int64 [T * k]: the token of each sorted pair
    ends: torch.Tensor  # int32 [E]: where each expert's pairs end in the sorted order
    num_tokens: int

    @classmethod
    def of(cls, ids: torch.Tensor, num_experts: int) -> _ExpertPairs:
        """Pairs whose id lies outside [0, num_experts) belong to experts another rank holds: left out."""
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1).long()
        kept = ((flat >= 0) & (flat < num_experts)).nonzero().squeeze(1)
        order = kept[torch.argsort(flat[kept], stable=True)]
        ends = torch.bincount(flat[kept], minlength=num_experts).cumsum(0).to(torch.int32)
        return cls(order, order // top_k, ends, num_tokens)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weighted sum of each token's expert outputs y [T * k, H] (sorted pairs), in fp32 (float64 for
        float64), rounded once."""
        acc = wide(dtype)
        out = torch.zeros(self.num_tokens, y.shape[-1], dtype=acc, device=y.device)
        out.index_add_(0, self.token, y.to(acc) * weights.reshape(-1)[self.order, None].to(acc))
        return out.to(dtype)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]:ends[e] of x [N, K] times w[e]^T ([E, out, K]) -> [N, out]. torch's grouped matmul needs
    the contraction stride to be a multiple of 16 bytes; other widths (toy models) are zero-padded, which adds
    exact zeros to every dot product."""
    pad = -x.shape[-1] % (16 // x.element_size())
    if pad:
        x, w = F.pad(x, (0, pad)), F.pad(w, (0, pad))
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)


# ---- FP8 block dequantization (used by the loader and as the oracle for FP8 kernels) ------------------------------

# Decoding e4m3 through float16: the byte's sign, exponent and mantissa bits, moved into float16's fields
# (s eeee mmm -> s 0eeee mmm 0000000), read as float16 give exactly 2^-8 times the e4m3 value, subnormals
# included (both formats' subnormals line up at that offset). float16 -> float32 is one vectorized instruction,
# where torch's own float8 -> float32 cast is scalar and ~15x slower. The 2^8 is folded into the block scales.
_E4M3_TO_F16_BITS = -16512  # int16 0xBF80: keeps the shifted sign and the exponent/mantissa bits
_E4M3_IN_F16_SCALE = 256.0
_E4M3_NAN_IN_F16 = 1.875
_CHUNK_ELEMENTS = 1 << 19  # per thread: a cache-sized scratch, so the passes over a chunk stay in cache


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W[i, j] = float(W_fp8[i, j]) * scale_inv[i // bn, j // bk], computed in fp32 and rounded once to dtype.

    Works on [out, in] or stacked [..., out, in]; ragged tails of sizes that are not block multiples included. Writes
    into `out` (any strides, e.g. a transposed view of a backend's layout) when given. Converts a few block rows at
    a time, so besides `out` it allocates only a small scratch, whatever the size of the weight."""
    bn, bk = block
    rows, cols = weight.shape[-2:]
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    weights, scales, outs = weight.reshape(-1, rows, cols), scale_inv.reshape(-1, *scale_inv.shape[-2:]), out.view(-1, rows, cols)
    chunk = max(1, _CHUNK_ELEMENTS // (bn * cols) * torch.get_num_threads()) * bn  # rows, a whole number of blocks
    bits = torch.empty(min(chunk, rows), cols, dtype=torch.int16, device=weight.device)
    values = torch.empty(min(chunk, rows), cols, dtype=torch.float32, device=weight.device)
    for w, s, o in zip(weights, scales, outs):
        # one fp32 scale per (block row, column), times the 2^8 of the float16 decoding (exact: a power of two)
        col_scale = (s.float() * _E4M3_IN_F16_SCALE).repeat_interleave(bk, dim=-1)[:, :cols]
        for r0 in range(0, rows, chunk):
            n = min(chunk, rows - r0)
            b, v = bits[:n], values[:n]
            b.copy_(w[r0:r0 + n].view(torch.int8))  # sign-extends, so the shift below leaves the sign in bit 15
            b.bitwise_left_shift_(7).bitwise_and_(_E4M3_TO_F16_BITS)
            v.copy_(b.view(torch.float16))
            _restore_nans(w[r0:r0 + n], v)
            full = n // bn * bn
            v[:full].view(-1, bn, cols).mul_(col_scale[r0 // bn:(r0 + full) // bn, None, :])
            if full < n:  # a last block row shorter than bn
                v[full:].mul_(col_scale[(r0 + full) // bn])
            o[r0:r0 + n].copy_(v)
    return out


def _restore_nans(w: torch.Tensor, values: torch.Tensor) -> None:
    """e4m3fn has no infinities and one NaN pattern per sign (0x7F, 0xFF), which the float16 decoding reads as
    +-1.875, a magnitude no finite e4m3 value decodes to (448 reads as 1.75). One min/max pass over the decoded
    chunk rules them out; only a chunk that has one pays for the mask."""
    low, high = torch.aminmax(values)
    if high.item() == _E4M3_NAN_IN_F16 or low.item() == -_E4M3_NAN_IN_F16:
        values[(w.view(torch.uint8) & 0x7F) == 0x7F] = float("nan")
