"""The routed-expert block: dispatch order -> gate/up GEMM with SiLU-and-mul fused -> down GEMM -> weighted
combine. Two launches of one grouped GEMM cover all active experts; no Python loop over experts or tokens.

Paths:
- Triton (gemm.py): every dtype and FP8 block weights; capture-safe (decode graphs), thin tiles for decode.
- torch._grouped_mm: bf16 prefill on GPUs where torch has a grouped GEMM (CUTLASS on Hopper). Pairs are
  gathered in expert order (no padding), then a Triton SiLU-and-mul between the two grouped GEMMs.
Both end in the same combine kernel: out[t] = sum_j weight[t, j] * y[pair(t, j)], accumulated in fp32 and
rounded once (the reference's index_add in fp32, in slot order instead of expert order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.backends.base import ExpertWeights
from moerun.backends.cuda import gemm, routing
from moerun.backends.cuda.device import max_shared_memory
from moerun.backends.cuda.triton_utils import INTERPRETING, next_pow2, round_as, rows_per_program, to_dtype


@triton.jit
def _combine_kernel(y_ptr, w_ptr, row_ptr, out_ptr, num_tokens, hidden, stride_y, stride_o,
                    TOP_K: tl.constexpr, HAS_ROW_MAP: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    t_ok = t < num_tokens
    mask = t_ok & (h < hidden)
    acc = tl.zeros([ROWS, BLOCK_H], tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        if HAS_ROW_MAP:
            row = tl.load(row_ptr + pair, mask=t_ok, other=0).to(tl.int64)
        else:
            row = pair
        y = tl.load(y_ptr + row * stride_y + h, mask=mask, other=0.0).to(tl.float32)
        acc += y * tl.load(w_ptr + pair, mask=t_ok, other=0.0)
    tl.store(out_ptr + t * stride_o + h, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


def combine(y: torch.Tensor, weights: torch.Tensor, num_tokens: int, row_of_pair: torch.Tensor | None = None) -> torch.Tensor:
    """y [pairs, H] -> [T, H]: the weighted sum of each token's top_k expert outputs."""
    top_k, hidden = weights.shape[1], y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if num_tokens:
        block_h = min(1024, next_pow2(hidden))
        rows = rows_per_program(num_tokens)
        _combine_kernel[(triton.cdiv(num_tokens, rows), triton.cdiv(hidden, block_h))](
            y, weights.contiguous(), row_of_pair if row_of_pair is not None else weights, out, num_tokens, hidden,
            y.stride(0), out.stride(0), TOP_K=top_k, HAS_ROW_MAP=row_of_pair is not None, ROWS=rows, BLOCK_H=block_h,
            num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    out = round_as(gate / (1.0 + tl.exp(-gate)), dtype) * up
    tl.store(out_ptr + row * stride_o + cols, to_dtype(out, dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate columns, then up) -> silu(gate) * up [N, I]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, next_pow2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                            BLOCK=block, num_warps=4)
    return out


def experts_triton(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    num_tokens, top_k = ids.shape
    num_experts, inter, hidden = w.w13.shape[0], w.w2.shape[2], x.shape[1]
    num_pairs = num_tokens * top_k
    fp8 = w.w13_scale_inv is not None
    cfg = gemm.pick_config(num_pairs / max(1, min(num_experts, num_pairs)), w.block[1] if fp8 else None, INTERPRETING,
                           x.element_size(), max_shared_memory(x.device))
    dispatch = routing.align(ids, num_experts, cfg.block_m)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    gemm.grouped(x, w.w13, h, dispatch, cfg, a_row_div=top_k, gated=True, scale=w.w13_scale_inv, block=w.block)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    gemm.grouped(h, w.w2, y, dispatch, cfg, a_row_div=1, gated=False, scale=w.w2_scale_inv, block=w.block)
    return combine(y, weights, num_tokens)


def experts_grouped_mm(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """bf16 experts through torch._grouped_mm (offsets read on the device; not for graph capture)."""
    num_tokens, top_k = ids.shape
    num_experts = w.w13.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    gate_up = torch._grouped_mm(x[order // top_k], w.w13.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(silu_mul(gate_up), w.w2.transpose(-2, -1), offs=offs)
    rows = torch.arange(order.numel(), dtype=torch.int32, device=x.device)
    row_of_pair = torch.empty_like(rows).scatter_(0, order, rows)  # where each pair's output landed
    return combine(y, weights, num_tokens, row_of_pair)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")
