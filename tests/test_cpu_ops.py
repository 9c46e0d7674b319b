"""The CPU reference ops against transformers' own MiniMax-M2 modules and plain math written differently.
Every other backend's ops are tested against these, so these are tested against something nobody here wrote."""

from __future__ import annotations

import math

import pytest
import torch

from moerun.backends.cpu import ops


def _hf():
    from transformers.models.minimax_m2 import modeling_minimax_m2 as m

    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    norm = _hf().MiniMaxM2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    norm = norm.to(dtype)
    x = torch.randn(7, 96).to(dtype) * 3
    assert torch.equal(ops.rms_norm(x, norm.weight.data, 1e-6), norm(x).detach())


def test_rotary_matches_transformers_partial_neox():
    hf = _hf()
    q, k = torch.randn(5, 6, 32), torch.randn(5, 2, 32)
    rot = 8
    pos = torch.tensor([0, 1, 7, 100, 4095])
    inv_freq = 1.0 / (5e6 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = pos[:, None].float() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    ours_q, ours_k = ops.rotary(q, k, cos, sin)
    # transformers works on [B, H, T, D] with cos/sin [B, T, rot]
    ref_q, ref_k = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.allclose(ours_q, ref_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(ours_k, ref_k[0].transpose(0, 1), atol=1e-6)
    assert torch.equal(ours_q[..., rot:], q[..., rot:])  # dims past rotary_dim pass through untouched


def test_rotary_pairs_i_with_i_plus_half():
    """Element i rotates with element i + rot/2 (NeoX), by angle pos * theta^(-2i/rot): checked element-wise."""
    q = torch.randn(1, 1, 16)
    rot, pos, theta = 8, 3.0, 5e6
    ang = [pos * theta ** (-2 * i / rot) for i in range(rot // 2)]
    cos = torch.tensor([math.cos(a) for a in ang * 2])[None]
    sin = torch.tensor([math.sin(a) for a in ang * 2])[None]
    out, _ = ops.rotary(q, q, cos, sin)
    for i in range(rot // 2):
        a, b = q[0, 0, i].item(), q[0, 0, i + rot // 2].item()
        assert out[0, 0, i].item() == pytest.approx(a * math.cos(ang[i]) - b * math.sin(ang[i]), abs=1e-5)
        assert out[0, 0, i + rot // 2].item() == pytest.approx(b * math.cos(ang[i]) + a * math.sin(ang[i]), abs=1e-5)


def test_paged_attention_matches_sdpa_on_contiguous_sequences():
    torch.manual_seed(0)
    hq, hkv, d, block = 8, 2, 16, 4
    lens, q_lens = [9, 1, 14], [9, 1, 3]  # a full prefill, a one-token sequence, a decode-like chunk
    cache = ops.allocate_kv_cache(16, block, hkv, d, torch.float32)
    free = list(torch.randperm(16).tolist())  # scattered blocks
    tables, ks, vs = [], [], []
    for n in lens:
        blocks = [free.pop() for _ in range(-(-n // block))]
        tables.append(blocks + [0] * (4 - len(blocks)))
        k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        slots = torch.tensor([blocks[p // block] * block + p % block for p in range(n)])
        ops.write_kv(cache, k, v, slots)
        ks.append(k)
        vs.append(v)
    qs = [torch.randn(n, hq, d) for n in q_lens]
    starts = [0, 9, 10, 13]
    out = ops.attention(torch.cat(qs), cache, starts, lens, torch.tensor(tables, dtype=torch.int32), 0.25)
    for b, n in enumerate(lens):
        q = qs[b].transpose(0, 1)  # [H, q, D]
        k = ks[b].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        v = vs[b].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        mask = torch.ones(q_lens[b], n, dtype=torch.bool).tril(diagonal=n - q_lens[b])
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25).transpose(0, 1)
        assert torch.allclose(out[starts[b]:starts[b + 1]], ref, atol=1e-5)


def _paged(lens, hkv, d, block, num_blocks, dtype, seed):
    """K/V of each sequence written into scattered cache blocks; the contiguous copies and the block tables."""
    gen = torch.Generator().manual_seed(seed)
    cache = ops.allocate_kv_cache(num_blocks, block, hkv, d, dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-n // block) for n in lens)
    tables, ks, vs = [], [], []
    for n in lens:
        blocks = [free.pop() for _ in range(-(-n // block))]
        tables.append(blocks + [0] * (width - len(blocks)))
        k, v = torch.randn(n, hkv, d, generator=gen).to(dtype), torch.randn(n, hkv, d, generator=gen).to(dtype)
        ops.write_kv(cache, k, v, torch.tensor([blocks[p // block] * block + p % block for p in range(n)]))
        ks.append(k)
        vs.append(v)
    return cache, torch.tensor(tables, dtype=torch.int32), ks, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_of_a_mixed_step_matches_float64_math(dtype):
    """Decode rows, prompt chunks after a cached prefix and a whole prompt in one step (both groups of the
    padded formulation, scattered blocks), against per-sequence float64 softmax(q k^T) v, query head h reading
    KV head h // 3. fp32 differs only in summation order; bf16 rounds the output once (half an ulp, 2^-9
    relative) and the probabilities before P @ V (at most 2^-9 max|V|, as FlashAttention does): 2x that."""
    hq, hkv, d, block = 6, 2, 16, 4
    lens, q_lens = [9, 1, 14, 30, 7], [1, 1, 3, 30, 1]
    cache, tables, ks, vs = _paged(lens, hkv, d, block, 32, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, hq, d, generator=gen).to(dtype) for n in q_lens]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    out = ops.attention(torch.cat(qs), cache, starts, lens, tables, 0.3)
    assert out.dtype == dtype
    for b, (n, q_len) in enumerate(zip(lens, q_lens)):
        for i in range(q_len):
            position = n - q_len + i
            for h in range(hq):
                k, v = ks[b][:position + 1, h // 3].double(), vs[b][:position + 1, h // 3].double()
                p = torch.softmax(k @ qs[b][i, h].double() * 0.3, dim=0)
                ref = p @ v
                got = out[starts[b] + i, h].double()
                bound = 1e-5 * ref.abs().max() if dtype == torch.float32 else 2 * 2 ** -9 * (ref.abs() + v.abs().max())
                assert ((got - ref).abs() <= bound).all(), (b, i, h)


def test_routing_and_experts_match_transformers_moe_block():
    hf = _hf()
    from transformers import MiniMaxM2Config

    cfg = MiniMaxM2Config(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=3)
    block = hf.MiniMaxM2SparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        block.e_score_correction_bias.copy_(torch.randn(8))
    x = torch.randn(1, 40, 32)
    ref = block(x).detach()[0]
    logits = torch.nn.functional.linear(x[0], block.gate.weight)
    weights, ids = ops.route(logits, block.e_score_correction_bias, 3)
    _, ref_w, ref_ids = block.gate(x[0], block.e_score_correction_bias)
    # same experts chosen (order inside the top-k is free), same weights per expert
    assert torch.equal(ids.sort(-1).values.long(), ref_ids.sort(-1).values)
    assert torch.allclose(torch.zeros(40, 8).scatter(1, ids.long(), weights),
                          torch.zeros(40, 8).scatter(1, ref_ids, ref_w), atol=1e-6)
    out = ops.experts(x[0], weights, ids, block.experts.gate_up_proj.data, block.experts.down_proj.data)
    assert torch.allclose(out, ref, atol=1e-5)


def test_routing_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0])  # pushes experts 2 and 3 into the top-2
    weights, ids = ops.route(logits, bias, 2)
    s = torch.sigmoid(torch.tensor([0.0, -1.0]))
    assert sorted(ids[0].tolist()) == [2, 3]
    got = dict(zip(ids[0].tolist(), weights[0].tolist()))
    assert got[2] == pytest.approx((s[0] / s.sum()).item()) and got[3] == pytest.approx((s[1] / s.sum()).item())


def test_experts_with_unused_and_crowded_experts():
    """All tokens to one expert, several experts with none: dense per-token math as the oracle. The intermediate
    size 5 (20 bytes) is not a multiple of 16 bytes, so this also runs the zero-padded grouped matmul."""
    torch.manual_seed(1)
    e, h, i, t = 6, 8, 5, 10
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    x = torch.randn(t, h)
    ids = torch.tensor([[4, 1]] * t, dtype=torch.int32)
    weights = torch.rand(t, 2)
    out = ops.experts(x, weights, ids, w13, w2)
    for tok in range(t):
        ref = torch.zeros(h)
        for j in range(2):
            ex = ids[tok, j].item()
            g, u = w13[ex, :i] @ x[tok], w13[ex, i:] @ x[tok]
            ref += weights[tok, j] * (w2[ex] @ (g * torch.sigmoid(g) * u))
        assert torch.allclose(out[tok], ref, atol=1e-4)


def test_bfloat16_experts_round_like_per_expert_linears():
    """bf16: the grouped matmuls round each expert's outputs as separate F.linear calls would, so a per-pair
    loop written here (gate/up, SiLU-and-mul, down, each rounded to bf16; combine in fp32) gives the same
    result up to fp32 summation order."""
    gen = torch.Generator().manual_seed(4)
    e, h, i, t, k = 8, 64, 32, 24, 3
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * 0.2).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=gen) * 0.2).to(torch.bfloat16)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    weights, ids = ops.route(torch.randn(t, e, generator=gen), torch.zeros(e), k)
    out = ops.experts(x, weights, ids, w13, w2)
    ref = torch.zeros(t, h)
    for tok in range(t):
        for j in range(k):
            ex = ids[tok, j].item()
            gate_up = torch.nn.functional.linear(x[tok:tok + 1], w13[ex])
            hidden = torch.nn.functional.silu(gate_up[:, :i]) * gate_up[:, i:]
            ref[tok] += weights[tok, j] * torch.nn.functional.linear(hidden, w2[ex])[0].float()
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-3 * ref.abs().max()).all()
