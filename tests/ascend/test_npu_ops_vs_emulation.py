"""Each torch_npu op the backend calls, on a real NPU, against the CPU emulation with the same arguments: this is
what checks the emulation's fidelity claims (semantics, layouts, index conventions, output tuples). Integer
outputs must match exactly; float outputs within 16-bit rounding. Skipped, with the reason, without an NPU."""

from __future__ import annotations

import torch
from npu_host import NPU, requires_npu

from moerun.backends.ascend import emulation

gen = torch.Generator().manual_seed(7)
BF16 = torch.bfloat16

pytestmark = requires_npu


def randn(*shape, dtype=BF16, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def to_npu(value):
    if isinstance(value, torch.Tensor):
        return value.to(NPU)
    return [to_npu(v) for v in value] if isinstance(value, list) else value


def to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else type(value)(to_cpu(v) for v in value)


def both(name, *args, **kwargs):
    """(torch_npu's result on the NPU, brought back to the CPU; the emulation's result on the CPU)."""
    import torch_npu

    real = getattr(torch_npu, name)(*[to_npu(a) for a in args], **{k: to_npu(v) for k, v in kwargs.items()})
    return to_cpu(real), getattr(emulation, name)(*args, **kwargs)


def near(a, b, tol=2e-2):
    return (a.float() - b.float()).abs().max() <= tol * b.float().abs().max().clamp_min(1e-6)


def test_rms_norms():
    x, res, w = randn(8, 256, scale=3), randn(8, 256), randn(256)
    (y_real, rstd_real), (y_emu, rstd_emu) = both("npu_rms_norm", x, w, 1e-6)
    assert near(y_real, y_emu) and torch.allclose(rstd_real, rstd_emu, rtol=1e-3)
    real, emu = both("npu_add_rms_norm", x, res, w, 1e-6)
    assert near(real[0], emu[0]) and torch.equal(real[2], emu[2])


def test_swiglu_and_rotary():
    real, emu = both("npu_swiglu", randn(16, 2 * 96), dim=-1)
    assert near(real, emu)
    theta = torch.arange(9)[:, None] * torch.rand(32, generator=gen)[None, :]
    cos, sin = torch.cat((theta, theta), -1).cos().to(BF16), torch.cat((theta, theta), -1).sin().to(BF16)
    x = randn(1, 9, 4, 64)
    real, emu = both("npu_rotary_mul", x, cos.view(1, 9, 1, 64), sin.view(1, 9, 1, 64), rotary_mode="half")
    assert near(real, emu)


def test_gating_top_k():
    logits, bias = randn(32, 256, dtype=torch.float32, scale=2), randn(256, dtype=torch.float32, scale=0.5)
    real, emu = both("npu_moe_gating_top_k", logits, 8, bias=bias, k_group=1, group_count=1, group_select_mode=0,
                     renorm=0, norm_type=1, out_flag=False, routed_scaling_factor=1.0, eps=1e-20)
    real_order, emu_order = real[1].sort(-1), emu[1].sort(-1)  # the same experts; order within the k is free
    assert torch.equal(real_order.values, emu_order.values)
    assert torch.allclose(real[0].gather(1, real_order.indices), emu[0].gather(1, emu_order.indices), atol=1e-5)


def test_init_routing_grouped_matmul_unpermute():
    tokens, experts, top_k, hidden, inter = 24, 16, 4, 128, 64
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    ids[:, 0] = 3  # one expert gets every token, and some get none
    x = randn(tokens, hidden)
    real, emu = both("npu_moe_init_routing_v2", x, ids, active_num=tokens * top_k, expert_num=experts,
                     expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, experts],
                     quant_mode=-1, row_idx_type=0)
    assert torch.equal(real[0], emu[0]) and torch.equal(real[1], emu[1]) and torch.equal(real[2], emu[2])
    w13 = randn(experts, hidden, 2 * inter, scale=0.1)
    real_mm, emu_mm = both("npu_grouped_matmul", [emu[0]], [w13], group_list=emu[2].to(torch.int64), split_item=2,
                           group_type=0, group_list_type=1)
    assert near(real_mm[0], emu_mm[0])
    probs = torch.softmax(randn(tokens, top_k, dtype=torch.float32), -1).to(BF16)
    real_out, emu_out = both("npu_moe_token_unpermute", emu_mm[0], emu[1], probs=probs)
    assert near(real_out, emu_out)


def test_scatter_then_fused_attention_mixed_batch():
    import torch_npu

    heads, kv_heads, dim, block, num_blocks = 8, 2, 128, 128, 10
    q_lens, kv_lens = [5, 3, 1, 1], [5, 131, 40, 300]
    tables = torch.tensor([[7, 0, 0], [2, 5, 0], [9, 0, 0], [1, 3, 4]], dtype=torch.int32)
    key_cache, value_cache = randn(num_blocks, block, kv_heads, dim), randn(num_blocks, block, kv_heads, dim)
    slots = torch.tensor([tables[0, 0].item() * block + p for p in range(5)])
    k_new, v_new = randn(5, kv_heads, dim), randn(5, kv_heads, dim)
    kc_real, vc_real = key_cache.to(NPU), value_cache.to(NPU)
    torch_npu.npu_scatter_pa_kv_cache(to_npu(k_new), to_npu(v_new), kc_real, vc_real, to_npu(slots), cache_mode="Norm")
    emulation.npu_scatter_pa_kv_cache(k_new, v_new, key_cache, value_cache, slots, cache_mode="Norm")
    assert torch.equal(kc_real.cpu(), key_cache) and torch.equal(vc_real.cpu(), value_cache)
    query = randn(sum(q_lens), heads, dim)
    args = dict(atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1),
                actual_seq_lengths=torch.tensor(q_lens).cumsum(0).tolist(), actual_seq_lengths_kv=kv_lens,
                block_table=tables, num_heads=heads, num_key_value_heads=kv_heads, scale=dim ** -0.5,
                input_layout="TND", sparse_mode=3, block_size=block)
    real, emu = both("npu_fused_infer_attention_score", query, key_cache.view(num_blocks, block, -1),
                     value_cache.view(num_blocks, block, -1), **args)
    assert near(real[0], emu[0])
