"""Routed experts on Ascend, in the all-gather form vllm-ascend uses on one device:

  npu_moe_gating_top_k      sigmoid scores; the correction bias only selects; weights renormalized
  npu_moe_init_routing_v2   token-expert pairs sorted by expert: permuted rows + per-expert row counts
  npu_grouped_matmul        [rows, H] @ w13[e] (E, H, 2I) per expert group
  npu_swiglu                silu(first half) * second half: gate first, as MiniMax's w13 stacks it
  npu_grouped_matmul        [rows, I] @ w2[e] (E, I, H)
  npu_moe_token_unpermute   back to token order, weighted sum over each token's k experts

Not npu_moe_finalize_routing: vllm-ascend documents that it "will lead to accuracy issues" and combines with
npu_moe_token_unpermute instead (docs/ascend.md). The W8A8 experts (w8a8.py) share dispatch and combine.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from moerun.backends.base import ExpertRange, ExpertWeights

SIGMOID = 1  # npu_moe_gating_top_k norm_type
COUNT = 1  # npu_moe_init_routing_v2 expert_tokens_num_type / npu_grouped_matmul group_list_type: per-expert counts
GATHER_INDEX = 0  # npu_moe_init_routing_v2 row_idx_type: index[t*K + j] = row of pair (t, j) in the permuted rows
SINGLE_OUTPUT = 2  # npu_grouped_matmul split_item: one [M, N] output
GROUP_ALONG_M = 0  # npu_grouped_matmul group_type


@dataclasses.dataclass
class AscendExperts(ExpertRange):
    """One layer's experts (or this rank's: layer_experts 0 when they are all), pre-transposed for
    npu_grouped_matmul (x [M, K] @ w[e] [K, N])."""

    w13: torch.Tensor  # [E, H, 2I]: columns 0..I-1 are gate_proj (w1), I..2I-1 up_proj (w3)
    w2: torch.Tensor  # [E, I, H]


def expert_range(w: ExpertRange) -> dict[str, int]:
    """The loader's expert range as dispatch takes it: layer_experts 0 when the stacks hold the whole layer."""
    return {"first_expert": w.first_expert, "layer_experts": 0 if w.holds_all_experts else w.layer_experts}


def prepare(w: ExpertWeights, device: torch.device) -> AscendExperts:
    if w.block is not None or w.w13_scale_inv is not None:
        raise ValueError("ascend: FP8 expert weights reached the backend; capabilities.fp8_weights is False, "
                         "so the loader must dequantize them")
    # [E, 2I, H] -> [E, H, 2I]: the gate rows of w13 become the first I output columns, which is the half
    # npu_swiglu gates (swish(A) * B with A the first half), so no reordering is needed. Stacks from `empty` are
    # transposed views already (contiguous() is free); others are transposed here, on the host, so the device
    # receives one copy in its final layout.
    return AscendExperts(w13=w.w13.transpose(1, 2).contiguous().to(device),
                         w2=w.w2.transpose(1, 2).contiguous().to(device), **expert_range(w))


def route(ops: ModuleType, router_logits: torch.Tensor, bias: torch.Tensor,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] and fp32 bias [E] -> (weights fp32 [T, k], expert ids int32 [T, k]). The kernel wants the
    bias in the logits' dtype, so both stay fp32: a bf16 bias flips expert choices."""
    weights, ids, _ = ops.npu_moe_gating_top_k(
        router_logits.float(), top_k, bias=bias.float(), k_group=1, group_count=1, group_select_mode=0, renorm=0,
        norm_type=SIGMOID, out_flag=False, routed_scaling_factor=1.0, eps=1e-20)
    return weights, ids


def experts(ops: ModuleType, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            w: AscendExperts) -> torch.Tensor:
    """sum_j weights[t, j] * SwiGLU_expert(ids[t, j])(x[t]) -> [T, H] in x's dtype, over this rank's experts."""
    routed = dispatch(ops, x, ids, w.w13.shape[0], first_expert=w.first_expert, layer_experts=w.layer_experts)
    if routed.rows.shape[0] == 0:  # no token chose this rank's experts (the kernels take no empty inputs)
        return x.new_zeros(x.shape)
    gate_up = ops.npu_grouped_matmul([routed.rows], [w.w13], group_list=routed.counts, split_item=SINGLE_OUTPUT,
                                     group_type=GROUP_ALONG_M, group_list_type=COUNT)[0]
    hidden = ops.npu_swiglu(gate_up, dim=-1)
    down = ops.npu_grouped_matmul([hidden], [w.w2], group_list=routed.counts, split_item=SINGLE_OUTPUT,
                                  group_type=GROUP_ALONG_M, group_list_type=COUNT)[0]
    return combine(ops, down, routed, weights)


@dataclasses.dataclass
class Routed:
    """Token-expert pairs sorted by expert, as npu_moe_init_routing_v2 returns them."""

    rows: torch.Tensor  # [T*K, H], or [kept, H] when pairs of other ranks' experts were dropped
    row_of_pair: torch.Tensor  # int32 [T*K]: row of pair (t, j) at t*K + j; -1 for a dropped pair
    counts: torch.Tensor  # int64 [E]: rows per expert (group_list_type COUNT)
    row_scale: torch.Tensor  # fp32 [T*K]: the per-token scale handed in, carried to each row (else undefined)
    dropped: bool = False  # some pairs belong to other ranks' experts (expert parallelism)


def dispatch(ops: ModuleType, x: torch.Tensor, ids: torch.Tensor, num_experts: int,
             token_scale: torch.Tensor | None = None, first_expert: int = 0, layer_experts: int = 0) -> Routed:
    """Sort the T*K pairs by expert. x may be int8 with its per-token scale, which each row then carries.

    Under expert parallelism (layer_experts > 0: the stacks hold some of them) the active range keeps this rank's
    experts [first_expert, first_expert + num_experts): the kernel sorts the other pairs last and drops them, and
    the grouped matmuls then run on the kept rows only (their count read back once: a host sync per layer, which
    all-to-all dispatch (MC2) removes)."""
    num_tokens, top_k = ids.shape
    partial = layer_experts > 0
    rows, row_of_pair, counts, row_scale = ops.npu_moe_init_routing_v2(
        x.contiguous(), ids.to(torch.int32).contiguous(), scale=token_scale, active_num=num_tokens * top_k,
        expert_num=layer_experts if partial else num_experts, expert_tokens_num_type=COUNT,
        expert_tokens_num_flag=True, active_expert_range=[first_expert, first_expert + num_experts], quant_mode=-1,
        row_idx_type=GATHER_INDEX)
    counts = counts.to(torch.int64)
    if partial:
        kept = int(counts.sum())
        rows, row_scale = rows[:kept], row_scale[:kept]
    return Routed(rows, row_of_pair, counts, row_scale, dropped=partial)


def combine(ops: ModuleType, down: torch.Tensor, routed: Routed, weights: torch.Tensor) -> torch.Tensor:
    """Back to token order, weighted over each token's k experts. Probs in the tokens' dtype: the one combination
    the kernel documents for certain (fp32 tokens keep fp32 weights).

    Dropped pairs (other ranks' experts) point at zero rows appended after the kept ones, one each (the kernel
    takes every pair's row, without repeats), with weight 0: they add exact zeros."""
    row_of_pair = routed.row_of_pair
    if routed.dropped:
        num_pairs = row_of_pair.shape[0]
        dropped = row_of_pair < 0
        filler = (down.shape[0] + torch.cumsum(dropped.to(torch.int32), 0) - 1).to(torch.int32)
        row_of_pair = torch.where(dropped, filler, row_of_pair)
        down = torch.cat((down, down.new_zeros(num_pairs - down.shape[0], down.shape[1])))
        weights = weights.masked_fill(dropped.view(weights.shape), 0)
    return ops.npu_moe_token_unpermute(down, row_of_pair, probs=weights.to(down.dtype))
