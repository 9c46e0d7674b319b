"""MoE routing and dispatch order.

route: one kernel per step: sigmoid, bias-corrected top-k selection, renormalized unbiased weights, all fp32.
align: the token-expert pairs sorted by expert once, each expert's run padded to a multiple of the GEMM's
  BLOCK_M, so one grouped-GEMM launch covers every active expert (each M-block belongs to one expert). Pairs keep
  their original order inside an expert (a stable sort). Nothing here reads device values on the host, so all of
  it can be captured in a CUDA graph; buffers are sized by the worst case the host can compute from T alone.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from moerun.backends.cuda.triton_utils import loop_bound, next_pow2, rows_per_program


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_l,
                  TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    t_ok = t < num_tokens
    e = tl.arange(0, BLOCK_E)[None, :]
    e_ok = e < num_experts
    scores = tl.sigmoid(tl.load(logits_ptr + t * stride_l + e, mask=t_ok & e_ok, other=0.0).to(tl.float32))
    choice = tl.where(e_ok, scores + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32), float("-inf"))
    slot = tl.arange(0, BLOCK_K)[None, :]
    ids = tl.zeros([ROWS, BLOCK_K], tl.int32)
    picked = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for j in tl.static_range(TOP_K):  # top-k as k rounds of argmax: k is small (8 for M2)
        best = tl.argmax(choice, axis=1)[:, None]
        ids = tl.where(slot == j, best, ids)
        picked = tl.where(slot == j, tl.sum(tl.where(e == best, scores, 0.0), axis=1)[:, None], picked)
        choice = tl.where(e == best, float("-inf"), choice)
    weights = picked / tl.sum(picked, axis=1)[:, None]
    mask = t_ok & (slot < TOP_K)
    tl.store(weights_ptr + t * TOP_K + slot, weights, mask=mask)
    tl.store(ids_ptr + t * TOP_K + slot, ids, mask=mask)


def route(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        rows = rows_per_program(num_tokens)
        _route_kernel[(triton.cdiv(num_tokens, rows),)](
            logits, bias, weights, ids, num_tokens, num_experts, logits.stride(0), TOP_K=top_k, ROWS=rows,
            BLOCK_E=next_pow2(num_experts), BLOCK_K=next_pow2(top_k), num_warps=4)
    return weights, ids


@dataclasses.dataclass
class Dispatch:
    """Pairs (token t, slot j) are numbered p = t * top_k + j. sorted_pairs lists them expert by expert, each
    expert's run padded with the sentinel num_pairs to a multiple of block_m; block_expert[i] is the expert of
    M-block i; num_padded[0] is the padded length actually used (blocks past it are idle)."""

    sorted_pairs: torch.Tensor  # int32 [capacity]
    block_expert: torch.Tensor  # int32 [capacity // block_m]
    num_padded: torch.Tensor  # int32 [1]
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def dispatch_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The padded length can reach num_pairs + (active experts) * (block_m - 1), with at most
    min(num_experts, num_pairs) active experts."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_blocks, num_experts,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """One program: count per expert, pad, lay out the blocks, then place every pair in stable order."""
    experts = tl.arange(0, BLOCK_E)
    lane = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, loop_bound(num_pairs), CHUNK):
        e = tl.load(ids_ptr + c0 + lane, mask=c0 + lane < num_pairs, other=BLOCK_E)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for b0 in range(0, loop_bound(num_blocks), CHUNK):
        blocks = b0 + lane
        owner = tl.sum(((pad_end[None, :] <= (blocks * BLOCK_M)[:, None]) & (experts[None, :] < num_experts)).to(tl.int32),
                       axis=1)
        tl.store(block_expert_ptr + blocks, tl.minimum(owner, num_experts - 1), mask=blocks < num_blocks)
        slots = blocks[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(sorted_ptr + slots, tl.zeros([CHUNK, BLOCK_M], tl.int32) + num_pairs, mask=(blocks < num_blocks)[:, None])
    tl.debug_barrier()  # the sentinel fill above must land before the placements below overwrite it
    cursor = pad_start
    for c0 in range(0, loop_bound(num_pairs), CHUNK):
        ok = c0 + lane < num_pairs
        e = tl.load(ids_ptr + c0 + lane, mask=ok, other=BLOCK_E)
        onehot = e[:, None] == experts[None, :]
        base = tl.sum(tl.where(onehot, cursor[None, :], 0), axis=1)
        earlier = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])  # same expert, earlier in the chunk
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + base + rank, c0 + lane, mask=ok)
        cursor += tl.sum(onehot.to(tl.int32), axis=0)


def align(ids: torch.Tensor, num_experts: int, block_m: int, max_kernel_pairs: int = 1024) -> Dispatch:
    """ids int32 [T, k] -> Dispatch. Small steps (decode) use one Triton program; large ones a torch sort."""
    num_pairs = ids.numel()
    capacity = dispatch_capacity(num_pairs, num_experts, block_m)
    device = ids.device
    if num_pairs <= max_kernel_pairs:
        sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
        block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
        num_padded = torch.empty(1, dtype=torch.int32, device=device)
        if num_pairs:
            _align_kernel[(1,)](ids, sorted_pairs, block_expert, num_padded, num_pairs, capacity // block_m, num_experts,
                                BLOCK_M=block_m, BLOCK_E=next_pow2(num_experts), CHUNK=64, num_warps=8)
        else:
            num_padded.zero_()
            block_expert.zero_()
        return Dispatch(sorted_pairs, block_expert, num_padded, num_pairs, block_m)
    return align_torch(ids, num_experts, block_m)


def align_torch(ids: torch.Tensor, num_experts: int, block_m: int) -> Dispatch:
    """The same layout with torch ops (a stable sort), for steps with many pairs."""
    device = ids.device
    flat = ids.reshape(-1).long()
    num_pairs = flat.numel()
    capacity = dispatch_capacity(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    dest = (pad_end - padded)[expert_of] + torch.arange(num_pairs, device=device) - first_of_expert[expert_of]
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(pad_end, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return Dispatch(sorted_pairs, block_expert, pad_end[-1:].to(torch.int32), num_pairs, block_m)
