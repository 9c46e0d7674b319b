"""Oracles and helpers shared by the CUDA backend's tests (interpreted on the CPU, and on a GPU).

Everything here is plain torch written from the definitions, apart from the kernels: the FP8 reference quantizes
activations per token and K-group with torch's own e4m3 cast, and the paged caches are filled by the CPU
reference's write_kv and by our kernel from the same random K/V."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from moerun.backends.base import AttentionMetadata, ExpertWeights
from moerun.backends.cpu import ops
from moerun.backends.cpu.backend import CpuBackend


def gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    import importlib.util
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the GPU tests need compiled Triton kernels"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (the kernels are also tested on the CPU by tests/test_cuda_kernels_interpreted.py)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


# ---- comparisons -------------------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def frobenius_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_ulp_close(out: torch.Tensor, ref: torch.Tensor, ulps: float = 1, fp32_rel: float = 1e-5) -> None:
    """|out - ref| <= ulps units in the last place of ref's dtype at ref's magnitude, plus fp32_rel of max|ref| for
    fp32 sums in another order (so fp32 results: relative fp32_rel of max|ref|)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[ref.dtype]
    ref32 = ref.float()
    bound = ulps * eps * ref32.abs() + fp32_rel * ref32.abs().max()
    worst = ((out.float() - ref32).abs() - bound).max().item()
    assert worst <= 0, f"beyond {ulps} ulp: max excess {worst:.3g}"


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, cache: torch.Tensor, fp32_rel: float = 1e-5) -> None:
    """fp32: relative fp32_rel. 16-bit: P is rounded to the cache dtype before P @ V (FlashAttention practice) while
    the reference keeps fp32 probabilities, an error <= 2^-9 * max|V|, plus the final rounding (2^-9 |out|): we
    allow twice that."""
    if ref.dtype == torch.float32:
        assert rel(out, ref) <= fp32_rel
    else:
        bound = 2.0 ** -8 * (cache.float().abs().max() + ref.float().abs())
        assert ((out.float() - ref.float()).abs() <= bound).all(), (out.float() - ref.float()).abs().max()


# ---- paged caches --------------------------------------------------------------------------------------------------

def make_meta(query_lens, seq_lens, block_size, num_blocks, seed=0, device="cpu") -> AttentionMetadata:
    """Block tables drawn from a shuffled pool, so sequences' blocks are scattered and interleaved."""
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots = [], []
    for q_len, s_len in zip(query_lens, seq_lens):
        n = -(-s_len // block_size)
        table, pool = pool[:n], pool[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    width = max(map(len, tables))
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), query_lens_host=list(query_lens),
        seq_lens_host=list(seq_lens), block_size=block_size)


def filled_caches(seq_lens, kv_heads, head_dim, block_size, num_blocks, dtype, seed=0, device="cpu"):
    """The same random K/V written by the reference (its layout) and by our kernel (ours)."""
    from moerun.backends.cuda import kv_cache

    meta = make_meta(seq_lens, seq_lens, block_size, num_blocks, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    k, v = (torch.randn(sum(seq_lens), kv_heads, head_dim, generator=gen).to(dtype).to(device) for _ in range(2))
    ref = ops.allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device)
    ops.write_kv(ref, k, v, meta.slot_mapping)
    ours = kv_cache.allocate(num_blocks, block_size, kv_heads, head_dim, dtype, torch.device(device))
    kv_cache.write(ours, k, v, meta.slot_mapping)
    return ref, ours


def random_experts(experts, hidden, inter, dtype, seed=0, device="cpu"):
    """w13 [E, 2I, H], w2 [E, H, I] ~ N(0, 1/fan_in), drawn on the device (M2's stacks are 2.4G values each)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.empty(experts, 2 * inter, hidden, dtype=dtype, device=device).normal_(0, hidden ** -0.5, generator=gen),
            torch.empty(experts, hidden, inter, dtype=dtype, device=device).normal_(0, inter ** -0.5, generator=gen))


# ---- FP8 -----------------------------------------------------------------------------------------------------------

def quantize_block_fast(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (e4m3 weight, fp32 scale per block: amax / 448), vectorized over blocks."""
    bn, bk = block
    rows, cols = w.shape[-2:]
    pr, pc = -(-rows // bn) * bn, -(-cols // bk) * bk
    padded = F.pad(w.float(), (0, pc - cols, 0, pr - rows))
    tiles = padded.unflatten(-2, (pr // bn, bn)).unflatten(-1, (pc // bk, bk))  # [..., R, bn, C, bk]
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / 448.0  # [..., R, C]
    q = (tiles / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def fake_quant(a: torch.Tensor, group: int) -> torch.Tensor:
    """Per-token-group e4m3 quantize-dequantize, written as the plain definition: each `group` columns of a row share
    scale amax/448; values are multiplied by 448/amax, rounded to e4m3 by torch, then scaled back (fp32)."""
    a = a.float()
    out = torch.empty_like(a)
    for c in range(0, a.shape[-1], group):
        tile = a[..., c:c + group]
        amax = tile.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        out[..., c:c + group] = (tile * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (amax / 448.0)
    return out


def emulated_fp8_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Expert by expert over its pairs: fake-quantized activations times dequantized weights in fp64, rounded to x's
    dtype where the reference's torch ops round (gate/up output, silu, product, down output); combine in fp64."""
    dtype, inter, group = x.dtype, w.w2.shape[2], w.block[1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    flat = ids.reshape(-1).long()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().flatten()
        tokens = pairs // ids.shape[1]
        w13 = ops.dequantize_fp8_block(w.w13[e], w.w13_scale_inv[e], w.block, torch.float64)
        w2 = ops.dequantize_fp8_block(w.w2[e], w.w2_scale_inv[e], w.block, torch.float64)
        gate_up = (fake_quant(x[tokens], group).double() @ w13.T).to(dtype).double()
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        h = ((gate / (1 + torch.exp(-gate))).to(dtype).double() * up).to(dtype)
        y = (fake_quant(h, group).double() @ w2.T).to(dtype).double()
        out.index_add_(0, tokens, y * weights.reshape(-1)[pairs, None].double())
    return out.to(dtype)


@dataclasses.dataclass
class FakeQuantLinear:
    weight: torch.Tensor  # dequantized
    group: int


class Fp8EmulationBackend(CpuBackend):
    """The FP8 reference in plain torch: FP8 weights dequantized; the input of every FP8 matmul quantized per token
    and K-group to e4m3 and back (fake_quant); experts through emulated_fp8_experts. Register it with
    register_backend("fp8emu", "cuda_references:Fp8EmulationBackend")."""

    name = "fp8emu"
    capabilities = dataclasses.replace(CpuBackend.capabilities, fp8_weights=True)

    def prepare_linear(self, w):
        if w.scale_inv is None:
            return w.weight
        return FakeQuantLinear(ops.dequantize_fp8_block(w.weight, w.scale_inv, w.block, self.dtype), w.block[1])

    def linear(self, x, w):
        if isinstance(w, FakeQuantLinear):
            return F.linear(fake_quant(x, w.group).to(x.dtype), w.weight)
        return F.linear(x, w)

    def prepare_experts(self, w):
        return w

    def experts(self, x, weights, ids, experts):
        return emulated_fp8_experts(x, weights, ids, experts)
