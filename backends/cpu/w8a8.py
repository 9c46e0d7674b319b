"""Reference W8A8_DYNAMIC arithmetic (msModelSlim's per-channel int8 weights, per-token dynamic int8 activations),
in plain PyTorch: the oracle every backend's W8A8 path is tested against.

Its rounding points are those of the Ascend operator chain (docs/ascend.md), so a backend that follows them
matches to float rounding, and one that rounds elsewhere shows up:

  activations  q = round_half_even(x / s) clamped to [-128, 127], s = max|x| / 127 per row, in fp32
               (npu_dynamic_quant; an all-zero row gets s = 1)
  int8 GEMM    exact: int8 x int8 products summed in int32 (npu_quant_matmul, npu_grouped_matmul)
  linear       fp32 acc * w_scale[n] * s[t], rounded once to the activations' dtype (npu_quant_matmul)
  experts      each token quantized once (all its expert rows share its scale, as npu_moe_init_routing_v2 carries
               it); per expert: exact int32 gate_up; fp32 gate_up * w13_scale * s, silu(gate) * up, quantized
               again per row with no 16-bit rounding in between (npu_dequant_swiglu_quant); exact int32 down;
               fp32 down * w2_scale * s2, rounded once (npu_grouped_matmul with per_token_scale), where w2_scale is
               first rounded to bf16 for bf16 outputs, the scale dtype that form of the kernel takes; the
               weighted sum over a token's k experts in fp32, rounded once (npu_moe_token_unpermute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerun.backends.base import W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.ops import routed_sum

INT8_MAX = 127
INT8_MIN = -128


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: (q int8 like x, scale fp32 x.shape[:-1]) with x ~ q * scale.
    Per token for activations [T, H]; per output channel for weights [out, in] (msModelSlim's symmetric minmax)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xf / scale[..., None]).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N], exact: each product is at most 2^14 in magnitude and the
    kernels take K < 2^16, so no partial sum leaves int32."""
    return a.to(torch.int32) @ b.to(torch.int32).T


def down_scale_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the weight scale the per-token grouped matmul takes for this output dtype: bf16 for bf16
    outputs, fp32 otherwise (npu_grouped_matmul's int8 x int8 + per_token_scale table)."""
    return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32


def linear(x: torch.Tensor, w: W8A8LinearWeight) -> torch.Tensor:
    """x [T, in] -> [T, out] in x's dtype. A row-parallel slice (o_proj under tensor parallelism: `in` is this
    rank's columns) quantizes x per token over those columns only, as vllm-ascend's npu_dynamic_quant of the local
    input does, so the sum over ranks is not the one-device result bit for bit."""
    q, s = quantize_rows(x)
    acc = int8_matmul(q, w.weight).float()
    return (acc * w.scale.float() * s[:, None]).to(x.dtype)


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: W8A8ExpertWeights) -> torch.Tensor:
    """sum_j weights[t, j] * W8A8 SwiGLU expert ids[t, j] of x[t] -> [T, H] in x's dtype, over the experts the
    stacks hold (w.first_expert..: expert parallelism; the other pairs are another rank's). Under expert tensor
    parallelism the stacks hold a slice of each expert's intermediate, so the hidden activations are quantized
    per row over that slice only, as each rank's npu_dequant_swiglu_quant does."""
    inter = w.w2.shape[-1]
    q, s = quantize_rows(x)
    w2_scale = w.w2_scale.to(down_scale_dtype(x.dtype)).float()

    def expert_out(expert: int, tokens: torch.Tensor) -> torch.Tensor:
        gate_up = int8_matmul(q[tokens], w.w13[expert]).float() * w.w13_scale[expert].float() * s[tokens, None]
        hq, hs = quantize_rows(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        return (int8_matmul(hq, w.w2[expert]).float() * w2_scale[expert] * hs[:, None]).to(x.dtype)

    return routed_sum(x, weights, ids - w.first_expert, w.w13.shape[0], expert_out)

