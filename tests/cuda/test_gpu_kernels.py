"""The CUDA backend's ops on a GPU, compiled, at MiniMax-M2's dimensions (hidden 3072, 48 query / 8 kv heads of
128 with 64 rotary dims, 256 experts of 1536, top-8), against moerun.backends.cpu.ops run on the same GPU and
against plain-torch FP8 emulation (cuda_references.py). Skipped, with the reason, where no CUDA GPU is visible.

Tolerances, beyond those of tests/test_cuda_kernels_interpreted.py (whose reasoning carries over):
- a GPU's fp32 division, rsqrt and exp are approximations accurate to ~2 ulp of fp32, and its matmuls sum in their
  own order, so an fp32 result may land on the other side of a bf16 rounding boundary: 1 bf16 ulp, and fp32
  results to a relative 2e-5 (1e-5 doubled).
- MoE in bf16 against the reference's cuBLAS matmuls: both round each GEMM output once, but from fp32 sums in
  different orders; a one-ulp difference in the intermediate h then moves the down projection by 2^-9 of one of
  its 1536 terms. We allow 2 ulps plus 2e-3 of the largest output for that propagation.
- FP8: the quantization is bit-identical to the oracle (exact divisions, round-to-nearest casts); the e4m3
  tensor-core products accumulate in the hardware's order within each 128-block. FP8 linear: 1 bf16 ulp plus
  1e-4 of max. FP8 experts: <= 1% Frobenius (the re-quantization of h can turn a one-ulp difference into one
  e4m3 step, see the interpreted tests); both within 6% of the dequantized reference (activation rounding).
"""

from __future__ import annotations

import pytest
import torch
from cuda_references import (assert_attention_close, assert_ulp_close, emulated_fp8_experts, fake_quant, filled_caches,
                        frobenius_rel, gpu_skip_reason, make_meta, random_experts, rel)

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
pytest.importorskip("triton")

from moerun.backends.base import ExpertWeights, LinearWeight  # noqa: E402
from moerun.backends.cpu import ops  # noqa: E402
from moerun.backends.cuda import attention, fp8, kv_cache, moe, norm_rope, routing  # noqa: E402

DEV = "cuda"
H, HQ, HKV, D, ROT, E, K, INTER = 3072, 48, 8, 128, 64, 256, 8, 1536


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, H), (300, H), (64, HQ * D), (64, HKV * D)])
def test_rms_norm(dtype, rows, cols):
    gen = torch.Generator().manual_seed(cols)
    x, r = (torch.randn(rows, cols, generator=gen).to(dtype).to(DEV) for _ in range(2))
    w = (1 + 0.3 * torch.randn(cols, generator=gen)).to(dtype).to(DEV)
    assert_ulp_close(norm_rope.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), fp32_rel=2e-5)
    normed, summed = norm_rope.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, x + r)
    assert_ulp_close(normed, ops.rms_norm(x + r, w, 1e-6), fp32_rel=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(257, HQ, D, generator=gen).to(dtype).to(DEV)
    k = torch.randn(257, HKV, D, generator=gen).to(dtype).to(DEV)
    inv_freq = 1.0 / (5e6 ** (torch.arange(0, ROT, 2).float() / ROT))
    angles = torch.arange(257).float()[:, None] * inv_freq
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype).to(DEV) for f in (torch.cos, torch.sin))
    for out, ref in zip(norm_rope.rotary(q, k, cos, sin), ops.rotary(q, k, cos, sin)):
        assert_ulp_close(out, ref, fp32_rel=2e-5)


def test_write_kv():
    ref, ours = filled_caches([2048, 5, 700], HKV, D, 16, 200, torch.bfloat16, device=DEV)
    assert torch.equal(kv_cache.to_reference_layout(ours), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 64])
def test_attention_prefill_chunked_and_mixed(dtype, block_size):
    seq_lens = [2048, 300, 1, 777]
    ref_cache, cache = filled_caches(seq_lens, HKV, D, block_size, 4000 // block_size, dtype, device=DEV)
    gen = torch.Generator().manual_seed(5)
    for query_lens in (seq_lens, [1000, 300, 1, 5], [1, 1, 1, 700]):
        meta = make_meta(query_lens, seq_lens, block_size, 4000 // block_size, device=DEV)
        q = torch.randn(sum(query_lens), HQ, D, generator=gen).to(dtype).to(DEV)
        ref = ops.attention(q, ref_cache, meta.query_start_loc.tolist(), seq_lens, meta.block_tables, D ** -0.5)
        assert_attention_close(attention.prefill(q, cache, meta, D ** -0.5), ref, cache, fp32_rel=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_lens", [[2048], [32768], [2048] * 8, [2049, 1, 17, 4000] * 16], ids=["b1", "b1_32k", "b8", "b64"])
def test_attention_decode(dtype, seq_lens):
    num_blocks = sum(-(-s // 16) for s in seq_lens) + 4
    ref_cache, cache = filled_caches(seq_lens, HKV, D, 16, num_blocks, dtype, device=DEV)
    meta = make_meta([1] * len(seq_lens), seq_lens, 16, num_blocks, device=DEV)
    q = torch.randn(len(seq_lens), HQ, D, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    ref = ops.attention(q, ref_cache, list(range(len(seq_lens) + 1)), seq_lens, meta.block_tables, D ** -0.5)
    for bound in (max(seq_lens), meta.block_tables.shape[1] * 16):  # eager bound, and the graph-capture bound
        assert_attention_close(attention.decode(q, cache, meta, D ** -0.5, bound, sms()), ref, cache, fp32_rel=2e-5)


def test_route_m2():
    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(4096, E, generator=gen)).to(DEV)
    bias = (0.5 * torch.randn(E, generator=gen)).to(DEV)
    weights, ids = routing.route(logits, bias, K)
    ref_weights, ref_ids = ops.route(logits, bias, K)
    same = (ids.sort(-1).values == ref_ids.sort(-1).values).all(-1)
    # Rows may only differ where the k-th and (k+1)-th biased scores tie to within the GPU sigmoid's error.
    choice = (torch.sigmoid(logits.double()) + bias.double()).sort(-1, descending=True).values
    assert ((choice[:, K - 1] - choice[:, K]).abs()[~same] < 1e-6).all()
    assert same.float().mean() > 0.999
    order, ref_order = ids.long().argsort(-1), ref_ids.long().argsort(-1)
    assert (weights.gather(1, order) - ref_weights.gather(1, ref_order))[same].abs().max() <= 1e-6


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (64, 16), (128, 16), (2000, 64)])
def test_align_kernel_equals_sort(tokens, block_m):
    ids = ops.route(torch.randn(tokens, E, device=DEV), torch.zeros(E, device=DEV), K)[1]
    kernel, by_sort = routing.align(ids, E, block_m), routing.align_torch(ids, E, block_m)
    used = int(by_sort.num_padded)
    assert int(kernel.num_padded) == used and torch.equal(kernel.sorted_pairs, by_sort.sorted_pairs)
    assert torch.equal(kernel.block_expert[:used // block_m], by_sort.block_expert[:used // block_m])


@pytest.fixture(scope="module")
def m2_experts():
    return random_experts(E, H, INTER, torch.bfloat16, device=DEV)


def routed(tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16).to(DEV)
    weights, ids = ops.route(torch.randn(tokens, E, generator=gen).to(DEV), torch.zeros(E, device=DEV), K)
    return x, weights, ids


@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 1000])
def test_experts_bf16(tokens, m2_experts):
    x, weights, ids = routed(tokens)
    ref = ops.experts(x, weights, ids, *m2_experts)
    assert_ulp_close(moe.experts_triton(x, weights, ids, ExpertWeights(*m2_experts)), ref, ulps=2, fp32_rel=2e-3)
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        assert_ulp_close(moe.experts_grouped_mm(x, weights, ids, ExpertWeights(*m2_experts)), ref, ulps=2, fp32_rel=2e-3)


def random_fp8(shape, block, seed):
    """FP8 weights as a checkpoint holds them: e4m3 values over their whole range and positive block scales."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.empty(shape, dtype=torch.bfloat16, device=DEV).normal_(0, 100, generator=gen).clamp_(-448, 448)
    scale_shape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    return q.to(torch.float8_e4m3fn), torch.rand(scale_shape, generator=gen, device=DEV) * 1e-4 + 1e-5


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="no FP8 tensor cores")
@pytest.mark.parametrize("rows", [1, 64, 1000])
@pytest.mark.parametrize("shape", [(HQ * D, H), (HKV * D, H), (H, HQ * D)], ids=["q", "kv", "o"])
def test_fp8_linear(rows, shape):
    q, s = random_fp8(shape, (128, 128), 0)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEV)
    out = fp8.linear(x, fp8.prepare(LinearWeight(q, s, (128, 128)), torch.device(DEV)))
    w = ops.dequantize_fp8_block(q, s, (128, 128), torch.float64)
    assert_ulp_close(out, (fake_quant(x, 128).double() @ w.T).to(torch.bfloat16), fp32_rel=1e-4)
    assert frobenius_rel(out, x.double() @ w.T) <= 0.06


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="no FP8 tensor cores")
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_fp8_experts(tokens):
    (q13, s13), (q2, s2) = random_fp8((E, 2 * INTER, H), (128, 128), 0), random_fp8((E, H, INTER), (128, 128), 1)
    w = ExpertWeights(q13, q2, s13, s2, (128, 128))
    x, weights, ids = routed(tokens, seed=2)
    out = moe.experts_triton(x, weights, ids, w)
    assert frobenius_rel(out, emulated_fp8_experts(x, weights, ids, w)) <= 0.01
    dequantized = ops.experts(x, weights, ids, ops.dequantize_fp8_block(q13, s13, (128, 128), torch.bfloat16),
                              ops.dequantize_fp8_block(q2, s2, (128, 128), torch.bfloat16))
    assert frobenius_rel(out, dequantized) <= 0.06
    assert rel(out, dequantized) < 1  # sanity: not garbage
