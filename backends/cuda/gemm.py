"""One Triton GEMM for every matmul the backend does not hand to cuBLAS: C = A @ W^T with W [N, K] per expert.

- grouped (MoE): rows are token-expert pairs in the dispatch order of routing.align; one launch covers every
  active expert; the A row of pair p is p // A_ROW_DIV (top_k when A is the token activations), so tokens are
  gathered on load and never copied per expert.
- gated (w13): each program computes the gate columns n and the up columns I + n together and writes
  silu(gate) * up: SiLU-and-mul never touches memory on its own.
- FP8 (block-quantized W in float8_e4m3fn with fp32 scales per [bn, bk] block, multiplied in): each BLOCK_K =
  bk slice of an A row is quantized on load to e4m3 with its own scale (per-token-group, group = bk), the
  e4m3 x e4m3 product of the slice is accumulated in fp32 and scaled by (activation scale x weight block
  scale) before it joins the fp32 accumulator, i.e. precision is promoted every bk elements.
Results are rounded once to C's dtype, like a matmul; the gated epilogue rounds gate, up and silu(gate) to the
model dtype first, as the reference's separate torch ops do.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from moerun.backends.cuda.device import H100_SHARED_MEMORY
from moerun.backends.cuda.routing import Dispatch
from moerun.backends.cuda.triton_utils import loop_bound, mma, quantize_fp8_rows, round_as, to_dtype


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                 num_rows, N, K, up_offset,
                 stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                 stride_se, stride_sn, stride_sk,
                 GROUPED: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, FP8: tl.constexpr,
                 SCALE_BN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return  # beyond the used part of the worst-case dispatch buffer
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_rows  # padding holds the sentinel num_rows
        a_rows = (pairs // A_ROW_DIV).to(tl.int64)
        c_rows = pairs.to(tl.int64)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        a_rows = rows.to(tl.int64)
        c_rows = a_rows
        expert = 0
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + n[None, :] * stride_bn + k[:, None] * stride_bk  # a [BLOCK_K, BLOCK_N] tile of W^T
    s_ptrs = scale_ptr + expert * stride_se + (n // SCALE_BN) * stride_sn
    s_up_ptrs = scale_ptr + expert * stride_se + ((n + up_offset) // SCALE_BN) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, loop_bound(tl.cdiv(K, BLOCK_K))):
        k_ok = k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            a_q, a_scale = quantize_fp8_rows(a.to(tl.float32))
            w_scale = tl.load(s_ptrs + kb * stride_sk, mask=n_ok, other=0.0)
            acc += mma(a_q, b, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * a_scale[:, None] * w_scale[None, :]
            if GATED:
                w_scale_up = tl.load(s_up_ptrs + kb * stride_sk, mask=n_ok, other=0.0)
                acc_up += mma(a_q, b_up, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * a_scale[:, None] * w_scale_up[None, :]
        else:
            acc = mma(a, b, acc)
            if GATED:
                acc_up = mma(a, b_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    dtype = c_ptr.dtype.element_ty
    if GATED:
        gate = round_as(acc, dtype)
        acc = round_as(gate / (1.0 + tl.exp(-gate)), dtype) * round_as(acc_up, dtype)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + n[None, :] * stride_cn, to_dtype(acc, dtype),
             mask=row_ok[:, None] & n_ok[None, :])


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def stage_bytes(block_m: int, block_n: int, block_k: int, act_bytes: int, w_bytes: int, gated: bool) -> int:
    """Shared memory of one pipeline stage: an A tile and one (gated: two) W tiles."""
    return block_m * block_k * act_bytes + block_k * block_n * w_bytes * (2 if gated else 1)


def smem_estimate(cfg: GemmConfig, act_bytes: int, w_bytes: int, gated: bool = True) -> int:
    """An upper bound of the kernel's shared memory: num_stages copies of a stage (sm_90 compiles of this kernel
    measured at most that, e.g. 139264 <= 3 x 49152 bytes for M2's FP8 gate/up tiles 64x128x128)."""
    return max(cfg.num_stages, 1) * stage_bytes(cfg.block_m, cfg.block_n, cfg.block_k, act_bytes, w_bytes, gated)


def pick_config(rows_per_group: float, fp8_block_k: int | None, interpreted: bool = False,
                act_bytes: int = 2, smem_limit: int = H100_SHARED_MEMORY) -> GemmConfig:
    """Tile sizes from the expected rows per expert (or all rows for a dense matmul). Decode has ~1-8 rows per
    expert: thin M tiles, weights streamed. fp32 activations and weights (act_bytes 4) get half-deep K tiles and
    two stages, to stay inside shared memory. Untuned heuristics: unmeasured on a GPU when written.

    The tiles must fit smem_limit (the device's shared memory per block; Triton refuses a launch above it): where
    they do not (99 KiB GPUs, FP8 blocks with bk = 256) fewer stages first (down to 2), then narrower N, then
    thinner M tiles, then one stage. M2's tiles on an H100 fit as chosen. The estimate assumes the gated GEMM
    (two W tiles), the larger of the two that share the config."""
    block_k = fp8_block_k or (64 if act_bytes <= 2 else 32)
    if interpreted:
        return GemmConfig(16, 64, block_k, 1, 1)
    stages = 4 if act_bytes <= 2 else 2
    if rows_per_group <= 16:
        block_m, block_n, warps = 16, 64, 4
    elif rows_per_group <= 64:
        block_m, block_n, warps = 32, 64 if fp8_block_k else 128, 4
    else:
        block_m, block_n, warps, stages = 64, 128, 4 if fp8_block_k else 8, min(stages, 3)
    w_bytes = 1 if fp8_block_k else act_bytes
    while stages * stage_bytes(block_m, block_n, block_k, act_bytes, w_bytes, True) > smem_limit:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        elif stages > 1:
            stages = 1
        else:
            break
    return GemmConfig(block_m, block_n, block_k, warps, stages)


def grouped(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, dispatch: Dispatch, cfg: GemmConfig, *,
            a_row_div: int, gated: bool, scale: torch.Tensor | None = None,
            block: tuple[int, int] | None = None) -> torch.Tensor:
    """out[p] = (silu(gate) * up if gated else plain) of a[p // a_row_div] @ w[expert(p)]^T for every pair p.
    w: [E, N, K] (gated: N = 2 * out.shape[1], gate rows then up rows), bf16/fp16/fp32 or FP8 with scale."""
    n_out = out.shape[1]
    grid = (dispatch.max_blocks, triton.cdiv(n_out, cfg.block_n))
    fp8 = scale is not None
    _gemm_kernel[grid](
        a, w, out, scale if fp8 else w, dispatch.sorted_pairs, dispatch.block_expert, dispatch.num_padded,
        dispatch.num_pairs, n_out, a.shape[1], n_out if gated else 0,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        *((scale.stride(0), scale.stride(1), scale.stride(2)) if fp8 else (0, 0, 0)),
        GROUPED=True, A_ROW_DIV=a_row_div, GATED=gated, FP8=fp8, SCALE_BN=block[0] if fp8 else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def dense_fp8(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor,
              cfg: GemmConfig) -> torch.Tensor:
    """out = a @ dequant(w)^T with activations quantized per token and K-group; w [N, K] e4m3, scale [N/bn, K/bk]."""
    rows, n_out = out.shape
    grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(n_out, cfg.block_n))
    _gemm_kernel[grid](
        a, w, out, scale, a, a, a, rows, n_out, a.shape[1], 0,
        a.stride(0), a.stride(1), 0, w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        0, scale.stride(0), scale.stride(1),
        GROUPED=False, A_ROW_DIV=1, GATED=False, FP8=True, SCALE_BN=block[0],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
