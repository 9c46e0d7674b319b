"""The documented limits of the torch_npu kernels the Ascend backend calls, checked against a model once, when it
is built: a model outside them is refused with one line naming the limit, never failed mid-request.

Every number cites the op whose documentation sets it (op-plugin docs/zh/custom_APIs/torch_npu, torch_npu 2.13).
"""

from __future__ import annotations

import torch

from moerun.backends.base import ModelSpec
from moerun.backends.errors import UnsupportedModelError

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # npu_fused_infer_attention_score on A2/A3
ATTENTION_HEAD_DIMS = (128, 192)  # FIA TND layout without rope; smaller head dims are zero-padded (attention.py)
MAX_HEADS = 256  # FIA: N <= 256 for query and KV heads
MAX_GQA_RATIO = 64  # FIA: num_heads / num_key_value_heads <= 64
# (FIA's KV_N * D <= 65535 for a (blocks, block_size, H) cache always holds: 256 heads x 192 dims at most.)
MAX_EXPERTS = 1024  # npu_grouped_matmul: at most 1024 groups (npu_moe_gating_top_k allows 2048)
MIN_EXPERTS = 3  # npu_moe_gating_top_k: experts per group (one group) must be > 2
MAX_TOP_K = 512  # npu_moe_token_unpermute: topK_num <= 512
INNER_LIMIT = 65536  # npu_grouped_matmul: every inner dim < 65536 on A2/A3
MAX_ROTARY_DIM = 896  # npu_rotary_mul: D < 896 and even
W8A8_INTERMEDIATE_ALIGN = 64  # npu_dequant_swiglu_quant with group_index: H (here I) 64-aligned ...
W8A8_MAX_INTERMEDIATE = 10496  # ... and <= 10496


def padded_head_dim(head_dim: int) -> int:
    """The head dim the attention kernel sees: the smallest supported one that holds head_dim."""
    return next(d for d in ATTENTION_HEAD_DIMS if d >= head_dim)


def padded_intermediate(inter: int) -> int:
    """The expert intermediate size the W8A8 kernels see: I rounded up to a multiple of 64 (zero-padded, exact)."""
    padded = -(-inter // W8A8_INTERMEDIATE_ALIGN) * W8A8_INTERMEDIATE_ALIGN
    if padded > W8A8_MAX_INTERMEDIATE:
        raise UnsupportedModelError(f"ascend: W8A8 intermediate_size {inter} is not supported: npu_dequant_swiglu_quant "
                                    f"takes at most {W8A8_MAX_INTERMEDIATE}; see docs/ascend.md")
    return padded


def check_model(spec: ModelSpec, block_sizes: tuple[int, ...], float32_attention: bool) -> None:
    for problem in _problems(spec, block_sizes, float32_attention):
        raise UnsupportedModelError(f"ascend: {problem}; see docs/ascend.md")


def _problems(spec: ModelSpec, block_sizes: tuple[int, ...], float32_attention: bool):
    dtype = str(spec.dtype).removeprefix("torch.")
    if spec.dtype not in KERNEL_DTYPES and not (float32_attention and spec.dtype == torch.float32):
        yield (f"model dtype {dtype} is not supported: npu_fused_infer_attention_score on Atlas A2/A3 takes "
               f"float16/bfloat16 only (float32 runs only with ascend.emulate: true)")
    if spec.head_dim > ATTENTION_HEAD_DIMS[-1]:
        yield (f"head_dim {spec.head_dim} is not supported: npu_fused_infer_attention_score (TND, no rope) takes "
               f"head dims up to {ATTENTION_HEAD_DIMS[-1]} (128 or 192; smaller ones are zero-padded)")
    if spec.num_heads > MAX_HEADS or spec.num_kv_heads > MAX_HEADS:
        yield (f"{spec.num_heads} query / {spec.num_kv_heads} KV heads: npu_fused_infer_attention_score takes "
               f"at most {MAX_HEADS}")
    if spec.num_heads % spec.num_kv_heads or spec.num_heads // spec.num_kv_heads > MAX_GQA_RATIO:
        yield (f"GQA ratio {spec.num_heads}/{spec.num_kv_heads} is not supported: npu_fused_infer_attention_score "
               f"needs num_heads a multiple of num_kv_heads with a ratio <= {MAX_GQA_RATIO}")
    if spec.kv_block_size not in block_sizes:
        yield (f"KV block size {spec.kv_block_size} is not supported: paged FIA prefill needs a multiple of 128 in "
               f"[128, 512]; moerun uses {', '.join(map(str, block_sizes))}")
    if not MIN_EXPERTS <= spec.num_experts <= MAX_EXPERTS:
        yield (f"{spec.num_experts} experts is not supported: npu_grouped_matmul takes at most {MAX_EXPERTS} groups "
               f"and npu_moe_gating_top_k needs more than 2 experts per group")
    if not 1 <= spec.top_k <= min(spec.num_experts, MAX_TOP_K):
        yield (f"top_k {spec.top_k} is not supported: it must lie in [1, num_experts] and npu_moe_token_unpermute "
               f"takes K <= {MAX_TOP_K}")
    if max(spec.hidden_size, 2 * spec.intermediate_size) >= INNER_LIMIT:
        yield (f"hidden_size and 2 x intermediate_size must be < {INNER_LIMIT}, npu_grouped_matmul's inner-dim "
               f"limit on A2/A3")
    if spec.rotary_dim % 2 or spec.rotary_dim >= MAX_ROTARY_DIM:
        yield f"rotary_dim {spec.rotary_dim} is not supported: npu_rotary_mul needs an even dim < {MAX_ROTARY_DIM}"
