"""W8A8_DYNAMIC on Ascend (msModelSlim checkpoints), the operator chain vllm-ascend runs:

  linear   npu_dynamic_quant(x) -> int8 rows + per-token scales
           npu_quant_matmul(x_q, w [in, out], w_scale fp32 [out], pertoken_scale, output_dtype=x's dtype)
  experts  npu_dynamic_quant(x), then npu_moe_init_routing_v2 carries each token's scale to its k rows
           npu_grouped_matmul(int8 rows, w13 [E, H, 2I], output_dtype=int32)           exact gate_up
           npu_dequant_swiglu_quant(gate_up, w13_scale [E, 2I], row scales, counts,
                                    activate_left=True, quant_mode=1)                   dequant, SwiGLU, int8 again
           npu_grouped_matmul(int8 hidden, w2 [E, I, H], scale=[w2_scale [E, H]], per_token_scale=[hidden scales])
           npu_moe_token_unpermute                                                      weighted combine

Weights are transposed to [in, out] on the host ([E, K, N] stacks for the grouped matmuls), as the kernels take
them. vllm-ascend also casts them to the FRACTAL_NZ format (npu_format_cast(w, 29)) for speed; moerun keeps ND,
the layout every one of these ops accepts, until that speed-up is measured on hardware (docs/ascend.md).

The per-token grouped matmul takes a bfloat16 weight scale for bfloat16 outputs (a float32 scale gives float16),
so w2_scale is stored in bfloat16 for bfloat16 models, a rounding point the CPU reference shares. With
group_index, npu_dequant_swiglu_quant needs I to be a multiple of 64 (M2: 1536); a smaller model's I is
zero-padded to one: padded gate/up columns are 0, so SwiGLU gives 0 there, which changes no row maximum and
meets zero rows of w2 — exact.

On several ranks each op runs on the rank's slices as is: npu_dynamic_quant of a row-parallel o_proj's (or split
w2's) local input quantizes each token over the rank's columns only, as vllm-ascend does, and the experts keep the
rank's range (first_expert, through npu_moe_init_routing_v2's active_expert_range as in moe.py).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch
import torch.nn.functional as F

from moerun.backends.ascend import moe
from moerun.backends.ascend.model_limits import padded_intermediate
from moerun.backends.base import ExpertRange, W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.w8a8 import down_scale_dtype

INT32 = torch.int32
DYNAMIC = 1  # npu_dequant_swiglu_quant quant_mode


@dataclasses.dataclass
class AscendW8A8Linear:
    weight: torch.Tensor  # int8 [in, out]
    scale: torch.Tensor  # fp32 [out]


@dataclasses.dataclass
class AscendW8A8Experts(ExpertRange):
    """One layer's experts (or this rank's, as AscendExperts), int8 in grouped-matmul layout."""

    w13: torch.Tensor  # int8 [E, H, 2I']: gate columns 0..I'-1, up columns I'..2I'-1 (I' = I padded to 64)
    w13_scale: torch.Tensor  # fp32 [E, 2I']
    w2: torch.Tensor  # int8 [E, I', H]
    w2_scale: torch.Tensor  # [E, H], bfloat16 for bfloat16 models, else fp32


def prepare_linear(w: W8A8LinearWeight, device: torch.device) -> AscendW8A8Linear:
    return AscendW8A8Linear(weight=w.weight.T.contiguous().to(device), scale=w.scale.float().to(device))


def linear(ops: ModuleType, x: torch.Tensor, w: AscendW8A8Linear) -> torch.Tensor:
    q, scale = ops.npu_dynamic_quant(x.contiguous())
    return ops.npu_quant_matmul(q, w.weight, w.scale, pertoken_scale=scale, output_dtype=x.dtype)


def prepare_experts(w: W8A8ExpertWeights, dtype: torch.dtype, device: torch.device) -> AscendW8A8Experts:
    """Stacks from AscendBackend.empty_experts are transposed views already, so without padding (M2's I is a
    multiple of 64) the transposes below copy nothing; padding builds new stacks."""
    inter = w.w2.shape[-1]
    pad = padded_intermediate(inter) - inter
    w13, w13_scale, w2 = w.w13, w.w13_scale, w.w2
    if pad:
        gate, up = w13[:, :inter], w13[:, inter:]
        gate_scale, up_scale = w13_scale[:, :inter], w13_scale[:, inter:]
        w13 = torch.cat((F.pad(gate, (0, 0, 0, pad)), F.pad(up, (0, 0, 0, pad))), dim=1)
        w13_scale = torch.cat((F.pad(gate_scale, (0, pad), value=1.0), F.pad(up_scale, (0, pad), value=1.0)), dim=1)
        w2 = F.pad(w2, (0, pad))
    return AscendW8A8Experts(
        w13=w13.transpose(1, 2).contiguous().to(device), w13_scale=w13_scale.float().contiguous().to(device),
        w2=w2.transpose(1, 2).contiguous().to(device), w2_scale=w.w2_scale.to(down_scale_dtype(dtype)).to(device),
        **moe.expert_range(w))


def experts(ops: ModuleType, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            w: AscendW8A8Experts) -> torch.Tensor:
    """Over this rank's experts (w.first_expert..), as moe.experts. Each token is quantized once over its whole
    hidden (replicated on every rank, so as on one device); under expert tensor parallelism
    npu_dequant_swiglu_quant requantizes each row over this rank's slice of the intermediate only."""
    q, scale = ops.npu_dynamic_quant(x.contiguous())
    routed = moe.dispatch(ops, q, ids, w.w13.shape[0], token_scale=scale, first_expert=w.first_expert,
                          layer_experts=w.layer_experts)
    if routed.rows.shape[0] == 0:  # no token chose this rank's experts (the kernels take no empty inputs)
        return x.new_zeros(x.shape)
    gate_up = ops.npu_grouped_matmul([routed.rows], [w.w13], group_list=routed.counts, split_item=moe.SINGLE_OUTPUT,
                                     group_type=moe.GROUP_ALONG_M, group_list_type=moe.COUNT, output_dtype=INT32)[0]
    hidden, hidden_scale = ops.npu_dequant_swiglu_quant(
        gate_up, weight_scale=w.w13_scale, activation_scale=routed.row_scale.view(-1, 1), group_index=routed.counts,
        activate_left=True, quant_mode=DYNAMIC)
    down = ops.npu_grouped_matmul([hidden], [w.w2], scale=[w.w2_scale], per_token_scale=[hidden_scale],
                                  group_list=routed.counts, split_item=moe.SINGLE_OUTPUT, group_type=moe.GROUP_ALONG_M,
                                  group_list_type=moe.COUNT, output_dtype=x.dtype)[0]
    return moe.combine(ops, down, routed, weights)
