"""CPU emulation of torch_npu's MoE routing ops: npu_moe_gating_top_k (router), npu_moe_init_routing_v2
(dispatch: sort token-expert pairs by expert) and npu_moe_token_unpermute (combine).

Semantics follow the numpy references ("等价计算逻辑") in op-plugin's docs and the formulas of the
torch_npu 2.13 docstrings; where the two disagree on what is supported, the 2.13 docstring (the version moerun
pairs with) wins: init_routing_v2 counts only in modes 1 and 2 and needs expert_tokens_num_flag=True.
"""

from __future__ import annotations

import torch

from moerun.backends.ascend.emulated_checks import (
    not_emulated, reject_given, require, require_dtype, undefined_like)

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_GATING_EXPERTS = 2048
MAX_ROUTING_EXPERTS = 10240
MAX_KEY_VALUE_EXPERTS = 5120
MAX_UNPERMUTE_TOPK = 512
INT32_MAX = 2**31 - 1


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """-> (y [T, k] in x's dtype, expert_idx int32 [T, k], norm_out fp32 [T, E]).

    In fp32: s = softmax(x) (norm_type 0) or sigmoid(x) (1); selection on s + bias (optionally restricted to
    the best k_group of group_count groups); weights gathered from the *unbiased* s, renormalized
    (y / (sum + eps)) for sigmoid only, then times routed_scaling_factor."""
    op = "npu_moe_gating_top_k"
    reject_given(op, input_ids=input_ids, tid2eid=tid2eid)
    require(x.dim() == 2, op, f"x must be 2-D [tokens, experts], got {x.dim()}-D")
    require_dtype(x, FLOATS, op, "x")
    experts = x.shape[1]
    require(experts <= MAX_GATING_EXPERTS, op, f"at most {MAX_GATING_EXPERTS} experts, got {experts}")
    require(renorm == 0, op, f"renorm only supports 0 (norm before top-k), got {renorm}")
    require(norm_type in (0, 1), op, f"norm_type must be 0 (softmax) or 1 (sigmoid), got {norm_type}")
    require(group_select_mode in (0, 1), op, f"group_select_mode must be 0 or 1, got {group_select_mode}")
    require(group_count > 0 and experts % group_count == 0, op,
            f"{experts} experts do not split into {group_count} groups")
    per_group = experts // group_count
    require(per_group > 2, op, f"experts per group must be > 2, got {per_group}")
    require(-(-per_group // 32) * 32 * group_count <= MAX_GATING_EXPERTS, op,
            "align32(experts / group_count) * group_count must be <= 2048")
    require(1 <= k_group <= group_count, op, f"k_group must lie in [1, group_count], got {k_group}")
    require(1 <= k <= per_group * k_group, op, f"k must lie in [1, {per_group * k_group}], got {k}")
    if bias is not None:
        # The bias must share x's dtype: a bf16 router therefore selects with a bf16 bias. Feed fp32 logits.
        require(bias.dtype == x.dtype, op,
                f"bias dtype {bias.dtype} must equal x's {x.dtype} (feed fp32 logits for an fp32 bias)")
        require(bias.shape == (experts,), op, f"bias must be [{experts}], got {tuple(bias.shape)}")

    scores = torch.softmax(x.float(), dim=-1) if norm_type == 0 else torch.sigmoid(x.float())
    choice = scores + bias.float() if bias is not None else scores.clone()
    if group_count > 1:
        grouped = choice.view(-1, group_count, per_group)
        group_score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :k_group]
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter(1, keep, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(-1, experts)
    # numpy's stable argsort of -choice: the higher score first, the lower expert id first among equals.
    idx = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
    y = scores.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    norm_out = scores if out_flag else undefined_like(tuple(x.shape), torch.float32, x.device)
    return y.to(x.dtype), idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0):  # noqa: B006 (torch_npu's default)
    """-> (expanded_x, expanded_row_idx int32 [T*K], expert_token_count_or_cumsum int64, expanded_scale fp32).

    Pairs (t, j) are flattened token-major (f = t*K + j) and stably sorted by expert id; pairs whose expert is
    outside active_expert_range sort last and are dropped. expanded_x[i] = x[sorted[i] // K]. With row_idx_type 0
    ("gather") expanded_row_idx[f] = the row of pair f in expanded_x (-1 when dropped); with 1 ("scatter")
    expanded_row_idx = sorted."""
    op = "npu_moe_init_routing_v2"
    reject_given(op, offset=offset)
    require(drop_pad_mode == 0, op, f"drop_pad_mode only supports 0 (dropless), got {drop_pad_mode}")
    require(quant_mode in (-1, 0, 1), op, f"quant_mode must be -1, 0 or 1, got {quant_mode}")
    require(quant_mode != 0, op, "quant_mode 0 (static quantization) is not supported")
    if quant_mode == 1:
        not_emulated(op, "quant_mode 1 (dynamic int8)")
    require(expert_tokens_num_flag, op, "expert_tokens_num_flag only supports True")
    require(expert_tokens_num_type in (1, 2), op,
            f"expert_tokens_num_type only supports 1 (count) and 2 (key_value), got {expert_tokens_num_type}")
    require(row_idx_type in (0, 1), op, f"row_idx_type must be 0 (gather) or 1 (scatter), got {row_idx_type}")
    require(x.dim() == 2, op, f"x must be 2-D [rows, hidden], got {x.dim()}-D")
    require_dtype(x, FLOATS + (torch.int8,), op, "x")
    require(expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op, "expert_idx must be [rows, K]")
    require_dtype(expert_idx, (torch.int32,), op, "expert_idx")
    require(active_num >= -1, op, f"active_num must be >= 0 (or -1), got {active_num}")

    limit = MAX_KEY_VALUE_EXPERTS if expert_tokens_num_type == 2 else MAX_ROUTING_EXPERTS
    require(-1 <= expert_num <= limit and expert_num != 0, op, f"expert_num must lie in [1, {limit}], got {expert_num}")
    if len(active_expert_range) == 0:
        require(expert_num > 0, op, "pass expert_num or active_expert_range (the default range is [0, expert_num))")
        start, end = 0, expert_num
    else:
        require(len(active_expert_range) == 2, op, "active_expert_range is [expert_start, expert_end]")
        start, end = (int(v) for v in active_expert_range)
        require(0 <= start < end <= MAX_ROUTING_EXPERTS, op,
                f"active_expert_range {[start, end]} must be increasing in [0, 10240]")
        require(expert_num == -1 or end <= expert_num, op, f"expert_end {end} must not exceed expert_num {expert_num}")
    if expert_num > 0:
        require(bool((expert_idx < expert_num).all()), op, f"expert ids must be < expert_num {expert_num}")

    rows, top_k = expert_idx.shape
    flat = expert_idx.reshape(-1).to(torch.int64)
    keyed = torch.where(flat < start, torch.full_like(flat, INT32_MAX), flat)  # below the range: sorted to the end
    order = torch.sort(keyed, stable=True).indices
    in_range = (flat >= start) & (flat < end)
    n_valid = int(in_range.sum())
    n_out = n_valid if active_num in (-1, 0) else min(active_num, n_valid)

    # Dropless: T*K rows; an active_num > 0 keeps min(active_num, T*K). Rows past the valid ones are unwritten.
    out_rows = rows * top_k if active_num in (-1, 0) else min(active_num, rows * top_k)
    expanded_x = undefined_like((out_rows, x.shape[1]), x.dtype, x.device)
    expanded_x[:n_out] = x[order[:n_out] // top_k]
    if row_idx_type == 1:
        expanded_row_idx = order.to(torch.int32)
    else:
        expanded_row_idx = torch.full((rows * top_k,), -1, dtype=torch.int32, device=x.device)
        expanded_row_idx[order[:n_valid]] = torch.arange(n_valid, dtype=torch.int32, device=x.device)

    counts = torch.bincount(flat[in_range] - start, minlength=end - start).to(torch.int64)
    if expert_tokens_num_type == 1:
        tokens = counts
    else:  # (expert id, count) of experts that got tokens, in id order, then a (0, 0) end marker if room is left
        nonzero = torch.nonzero(counts).flatten()
        pairs = torch.stack((nonzero + start, counts[nonzero]), dim=1)
        tokens = torch.zeros((expert_num if expert_num > 0 else end, 2), dtype=torch.int64, device=x.device)
        tokens[:pairs.shape[0]] = pairs

    expanded_scale = undefined_like((rows * top_k,), torch.float32, x.device)
    if scale is not None:
        require(scale.shape == (rows,) and scale.dtype == torch.float32, op,
                "without quantization scale is fp32 [rows]")
        expanded_scale[:n_out] = scale[order[:n_out] // top_k]
    return expanded_x, expanded_row_idx, tokens, expanded_scale


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t*K + j]] (K = 1 without probs)."""
    op = "npu_moe_token_unpermute"
    require(not padded_mode, op, "padded_mode only supports False")
    require(restore_shape is None, op, "restore_shape only supports None")
    require(permuted_tokens.dim() == 2, op, "permuted_tokens must be 2-D [tokens * K, hidden]")
    require_dtype(permuted_tokens, FLOATS, op, "permuted_tokens")
    require_dtype(sorted_indices, (torch.int32,), op, "sorted_indices")
    require(sorted_indices.dim() == 1, op, "sorted_indices must be 1-D [tokens * K]")
    if probs is None:
        top_k = 1
    else:
        require(probs.dim() == 2, op, "probs must be 2-D [tokens, K]")
        require_dtype(probs, FLOATS, op, "probs")
        top_k = probs.shape[1]
    require(top_k <= MAX_UNPERMUTE_TOPK, op, f"K must be <= {MAX_UNPERMUTE_TOPK}, got {top_k}")
    n = sorted_indices.shape[0]
    require(n % top_k == 0 and (probs is None or probs.shape[0] * top_k == n), op,
            f"sorted_indices holds {n} entries, not tokens x K")
    # Documented range is [0, tokens*K - 1] with no repeats; the kernel does not check, so the emulation does.
    require(bool(((sorted_indices >= 0) & (sorted_indices < permuted_tokens.shape[0])).all()), op,
            f"sorted_indices must lie in [0, {permuted_tokens.shape[0] - 1}]")
    require(sorted_indices.unique().numel() == n, op, "sorted_indices must not repeat")
    gathered = permuted_tokens[sorted_indices.long()].float().view(n // top_k, top_k, -1)
    if probs is not None:
        gathered = gathered * probs.float()[..., None]
    return gathered.sum(1).to(permuted_tokens.dtype)
