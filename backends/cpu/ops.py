"""Reference implementations of every backend op, in plain PyTorch.

Written for clarity and exactness first: statistics, softmax and the expert combine run in fp32 (in float64 when
the model runs in float64, as a high-precision reference does), and each op follows the MiniMax-M2 math of
transformers' MiniMaxM2ForCausalLM. Other backends' tests call these functions
directly as their oracle, so they take plain tensors (no backend state) and work on any device.
"""

from __future__ import annotations

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


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len cached K and V of one sequence, [seq_len, Hkv, D] each."""
    block_size = kv_cache.shape[2]
    blocks = block_table[: (seq_len + block_size - 1) // block_size].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
              block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention, one sequence at a time, in fp32. Query i of a sequence with q_len new tokens sits at
    position seq_len - q_len + i and sees keys 0..that position."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        q_len = end - start
        k, v = gather_kv(kv_cache, block_tables[b], seq_len)
        group = num_heads // k.shape[1]
        acc = wide(q.dtype)
        k = k.to(acc).repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.to(acc).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].to(acc), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out.view(-1, num_heads, head_dim)


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
            w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, each expert one matmul over its group of tokens."""
    inter = w2.shape[-1]

    def expert_out(expert: int, tokens: torch.Tensor) -> torch.Tensor:
        # .to: a no-op, unless the stack is held narrower than x (cpu `weights: checkpoint`)
        gate_up = F.linear(x[tokens], w13[expert].to(x.dtype))
        return F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[expert].to(x.dtype))

    return routed_sum(x, weights, ids, w13.shape[0], expert_out)


def routed_sum(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
               expert_out: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[t, j] * expert_out(ids[t, j], ...)[t] -> [T, H] in x's dtype. Token-expert pairs are sorted by
    expert once; expert_out(e, tokens) runs expert e on all its tokens at once (no loop over all experts per
    token) and returns their outputs in x's dtype. The weighted combine accumulates in fp32 (float64 for a
    float64 x), rounded once."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // top_k  # which token each sorted pair belongs to
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    acc = wide(x.dtype)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=acc, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        tokens = token_of_pair[start:start + count]
        start += count
        y = expert_out(expert, tokens)
        out.index_add_(0, tokens, y.to(acc) * weights.reshape(-1)[pairs, None].to(acc))
    return out.to(x.dtype)


# ---- FP8 block dequantization (used by the loader and as the oracle for FP8 kernels) ------------------------------

def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """W[i, j] = float(W_fp8[i, j]) * scale_inv[i // bn, j // bk], computed in fp32 and rounded once to dtype.
    Works on [out, in] or stacked [..., out, in]; ragged tails of sizes that are not block multiples included."""
    bn, bk = block
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)
