"""AscendBackend (emulate: true) op by op against the CPU reference ops, plus its setup: check_model refusals,
the one-line error without torch_npu, option checks, the emulation notice, and the real-torch_npu path with a
stand-in module."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from w8a8_cases import EXPERT_CASES, LINEAR_CASES, expert_case, linear_case

from moerun.backends.ascend import model_limits, npu_ops
from moerun.backends.ascend.backend import AscendBackend
from moerun.backends.base import AttentionMetadata, ExpertWeights, LinearWeight, ModelSpec, W8A8ExpertWeights
from moerun.backends.cpu import ops as ref
from moerun.backends.cpu import w8a8 as ref_w8a8
from moerun.backends.errors import ConfigError, MoerunError, UnsupportedModelError
from moerun.runtime.run_config import load_run_config, parse_run_config

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
gen = torch.Generator().manual_seed(1)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def close(actual, expected, dtype):
    scale = expected.float().abs().max().clamp_min(1e-6)
    return (actual.float() - expected.float()).abs().max() <= TOL[dtype] * scale


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def backend(request):
    return AscendBackend({"emulate": True, "device": "npu:0"}, request.param)


# ---- norms, rotary, linear -----------------------------------------------------------------------------------------

def test_rms_norm(backend):
    x, w = randn(9, 64, dtype=backend.dtype, scale=3), randn(64, dtype=backend.dtype)
    assert close(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), backend.dtype)


def test_add_rms_norm(backend):
    x, res, w = randn(9, 64, dtype=backend.dtype), randn(9, 64, dtype=backend.dtype), randn(64, dtype=backend.dtype)
    normed, summed = backend.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(summed, x + res)
    assert close(normed, ref.rms_norm(x + res, w, 1e-6), backend.dtype)


@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 64), (32, 32), (12, 4)], ids=["m2_partial", "full", "tiny"])
def test_rotary_first_rotary_dim_dims_only(backend, head_dim, rotary_dim):
    tokens = 7
    positions = torch.arange(3, 3 + tokens).float()
    inv_freq = 1.0 / (5e6 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    emb = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = emb.cos().to(backend.dtype), emb.sin().to(backend.dtype)
    q, k = randn(tokens, 6, head_dim, dtype=backend.dtype), randn(tokens, 2, head_dim, dtype=backend.dtype)
    (q1, k1), (q2, k2) = backend.rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)
    assert close(q1, q2, backend.dtype) and close(k1, k2, backend.dtype)
    assert torch.equal(q1[..., rotary_dim:], q[..., rotary_dim:])  # the tail dims pass through untouched


def test_linear(backend):
    x, w = randn(5, 32, dtype=backend.dtype), randn(48, 32, dtype=backend.dtype)
    weight = backend.prepare_linear(LinearWeight(w))
    assert close(backend.linear(x, weight), x.float() @ w.float().T, backend.dtype)


# ---- attention over the paged cache --------------------------------------------------------------------------------

BLOCK = 128


def metadata(seqs, num_blocks):
    """seqs: (cached tokens, new tokens) per sequence; blocks handed out shuffled, tables padded with 0."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, query_lens, seq_lens = [], [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [order.pop() for _ in range(-(-total // BLOCK))]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, total)]
        query_lens.append(new)
        seq_lens.append(total)
    width = max(len(t) for t in tables)
    starts = torch.tensor([0] + query_lens).cumsum(0)
    return AttentionMetadata(
        query_start_loc=starts.to(torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), query_lens_host=query_lens, seq_lens_host=seq_lens, block_size=BLOCK)


def prefix_metadata(meta, seqs):
    """The same sequences' cached prefixes (written in an earlier step), over the same block tables."""
    slots, qlens = [], []
    for b, (cached, _) in enumerate(seqs):
        table = meta.block_tables[b].tolist()
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached)]
        qlens.append(cached)
    return AttentionMetadata(query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, block_tables=meta.block_tables,
                             slot_mapping=torch.tensor(slots, dtype=torch.int64), query_lens_host=qlens,
                             seq_lens_host=list(qlens), block_size=BLOCK)


# prefill from scratch, prefill continuing a cached prefix across a block edge, decodes over 1..3 blocks
MIXED = [(0, 9), (125, 6), (40, 1), (300, 1), (0, 1)]


@pytest.mark.parametrize("seqs", [MIXED, [(0, 17), (0, 3)], [(130, 1), (7, 1)]], ids=["mixed", "prefill", "decode"])
@pytest.mark.parametrize("head_dim", [128, 48], ids=["d128", "d48_padded"])
def test_attention_matches_reference(backend, seqs, head_dim):
    heads, kv_heads, num_blocks = 8, 2, 12
    meta = metadata(seqs, num_blocks)
    ours = backend.allocate_kv_cache(num_blocks, BLOCK, kv_heads, head_dim, backend.dtype)
    theirs = ref.allocate_kv_cache(num_blocks, BLOCK, kv_heads, head_dim, backend.dtype)
    prefix = prefix_metadata(meta, seqs)
    if prefix.slot_mapping.numel():  # an earlier step wrote the cached prefixes
        kp, vp = randn(prefix.slot_mapping.numel(), kv_heads, head_dim, dtype=backend.dtype), \
            randn(prefix.slot_mapping.numel(), kv_heads, head_dim, dtype=backend.dtype)
        backend.write_kv(ours, kp, vp, prefix)
        ref.write_kv(theirs, kp, vp, prefix.slot_mapping)
    tokens = sum(n for _, n in seqs)
    q = randn(tokens, heads, head_dim, dtype=backend.dtype)
    k, v = randn(tokens, kv_heads, head_dim, dtype=backend.dtype), randn(tokens, kv_heads, head_dim, dtype=backend.dtype)
    backend.write_kv(ours, k, v, meta)
    ref.write_kv(theirs, k, v, meta.slot_mapping)
    scale = head_dim ** -0.5
    out = backend.attention(q, ours, meta, scale)
    expected = ref.attention(q, theirs, meta.query_start_loc.tolist(), meta.seq_lens_host, meta.block_tables, scale)
    assert out.shape == q.shape and close(out, expected, backend.dtype)


def test_kv_cache_layout_is_the_norm_layout(backend):
    cache = backend.allocate_kv_cache(4, BLOCK, 2, 128, backend.dtype)
    assert cache.key.shape == (4, BLOCK, 2, 128) and cache.value.dtype == backend.dtype
    padded = backend.allocate_kv_cache(4, BLOCK, 2, 40, backend.dtype)
    assert padded.key.shape == (4, BLOCK, 2, 128) and padded.head_dim == 40  # FIA TND takes D 128 or 192


# ---- MoE -------------------------------------------------------------------------------------------------------

def expert_weights(num_experts, hidden, inter, dtype):
    return ExpertWeights(w13=randn(num_experts, 2 * inter, hidden, dtype=dtype, scale=0.3),
                         w2=randn(num_experts, hidden, inter, dtype=dtype, scale=0.3))


def test_route(backend):
    logits, bias = randn(33, 16, scale=2), 0.5 * randn(16)
    (w1, i1), (w2, i2) = backend.route(logits, bias, 4), ref.route(logits, bias, 4)
    assert i1.dtype == torch.int32 and w1.dtype == torch.float32
    order1, order2 = i1.sort(-1), i2.sort(-1)  # the same experts; order within the k is free
    assert torch.equal(order1.values, order2.values)
    assert torch.allclose(w1.gather(1, order1.indices), w2.gather(1, order2.indices), atol=1e-6)


ROUTES = {
    "every expert": lambda t, e, k: torch.arange(t * k).view(t, k) % e,
    "some experts get none": lambda t, e, k: torch.stack([torch.randperm(3, generator=gen)[:k] * 2 for _ in range(t)]),
    "all to one expert and others": lambda t, e, k: torch.cat([torch.zeros(t, 1, dtype=torch.long),
                                                               torch.randint(1, e, (t, k - 1), generator=gen)], 1),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_experts_match_reference(backend, route):
    tokens, num_experts, top_k, hidden, inter = 11, 8, 2, 64, 24
    x = randn(tokens, hidden, dtype=backend.dtype)
    ids = ROUTES[route](tokens, num_experts, top_k).to(torch.int32)
    weights = torch.softmax(randn(tokens, top_k), -1)
    w = expert_weights(num_experts, hidden, inter, backend.dtype)
    out = backend.experts(x, weights, ids, backend.prepare_experts(w))
    assert out.dtype == backend.dtype and close(out, ref.experts(x, weights, ids, w.w13, w.w2), backend.dtype)


def test_moe_end_to_end(backend):
    tokens, num_experts, hidden, inter = 20, 16, 64, 32
    x, logits, bias = randn(tokens, hidden, dtype=backend.dtype), randn(tokens, num_experts, scale=2), randn(num_experts)
    w = expert_weights(num_experts, hidden, inter, backend.dtype)
    out = backend.moe(x, logits, bias, 4, backend.prepare_experts(w))
    weights, ids = ref.route(logits, bias, 4)
    assert close(out, ref.experts(x, weights, ids, w.w13, w.w2), backend.dtype)


def test_prepare_experts_transposes_for_grouped_matmul(backend):
    w = expert_weights(4, 16, 6, backend.dtype)
    prepared = backend.prepare_experts(w)
    assert prepared.w13.shape == (4, 16, 12) and prepared.w2.shape == (4, 6, 16)
    assert torch.equal(prepared.w13[:, :, :6], w.w13[:, :6, :].transpose(1, 2))  # gate (w1) columns come first
    assert prepared.w13.is_contiguous() and prepared.w2.is_contiguous()


def test_fp8_weights_never_reach_the_backend(backend):
    """capabilities.fp8_weights is False (A2/A3 have no FP8): the loader dequantizes, anything else is a bug."""
    w = expert_weights(2, 8, 4, backend.dtype)
    w.block, w.w13_scale_inv = (128, 128), torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match="dequantize"):
        backend.prepare_experts(w)
    with pytest.raises(ValueError, match="dequantize"):
        backend.prepare_linear(LinearWeight(torch.zeros(4, 4), torch.ones(1, 1), (128, 128)))
    assert not backend.capabilities.fp8_weights


# ---- W8A8_DYNAMIC (int8 weights, per-token int8 activations) ---------------------------------------------------

@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_w8a8_linear_matches_reference(backend, case):
    x, w = linear_case(case, backend.dtype)
    out = backend.linear(x, backend.prepare_linear(w))
    assert out.dtype == backend.dtype and close(out, ref_w8a8.linear(x, w), backend.dtype)


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_w8a8_experts_match_reference(backend, case):
    x, weights, ids, w = expert_case(case, backend.dtype)
    out = backend.experts(x, weights, ids, backend.prepare_experts(w))
    assert out.dtype == backend.dtype and close(out, ref_w8a8.experts(x, weights, ids, w), backend.dtype)


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_w8a8_experts_of_one_rank_are_the_layers_with_the_other_pairs_weighed_zero(backend, case):
    """Expert parallelism, 2 experts per rank: each rank's stacks (first_expert.., of the layer's experts), on the
    Ascend ops and on the CPU reference, give the whole layer's result with the other ranks' pairs weighed 0 (in
    the sparse case ranks get no token at all: zeros)."""
    x, weights, ids, w = expert_case(case, backend.dtype)
    experts = w.w13.shape[0]
    for first in range(0, experts, 2):
        mine = (ids >= first) & (ids < first + 2)
        expected = ref_w8a8.experts(x, weights * mine, ids, w)
        part = W8A8ExpertWeights(w13=w.w13[first:first + 2], w13_scale=w.w13_scale[first:first + 2],
                                 w2=w.w2[first:first + 2], w2_scale=w.w2_scale[first:first + 2], first_expert=first,
                                 layer_experts=experts)
        ascend = backend.experts(x, weights, ids, backend.prepare_experts(part))
        assert close(ascend, expected, backend.dtype) and close(ref_w8a8.experts(x, weights, ids, part), expected,
                                                                backend.dtype), (case, first)


def test_w8a8_weights_are_laid_out_for_the_int8_kernels(backend):
    x, w = linear_case("prefill", backend.dtype)
    linear = backend.prepare_linear(w)
    assert torch.equal(linear.weight, w.weight.T) and linear.weight.is_contiguous()  # npu_quant_matmul's x2 [in, out]
    assert linear.scale.dtype == torch.float32
    _, _, _, e = expert_case("intermediate padded to 64", backend.dtype)
    experts = backend.prepare_experts(e)
    assert experts.w13.shape == (6, 64, 128) and experts.w2.shape == (6, 64, 64)  # I = 40 padded to 64
    assert torch.equal(experts.w13[:, :, :40], e.w13[:, :40].transpose(1, 2))  # gate (w1) columns first
    assert torch.equal(experts.w13[:, :, 64:104], e.w13[:, 40:].transpose(1, 2))  # then up (w3)
    assert not experts.w13[:, :, 40:64].any() and not experts.w2[:, 40:].any()  # zero padding
    assert experts.w2_scale.dtype == ref_w8a8.down_scale_dtype(backend.dtype) and experts.w13_scale.dtype == torch.float32


def test_w8a8_stacks_from_empty_experts_are_handed_over_without_a_copy(backend):
    """I a multiple of 64 (M2's 1536) needs no padding: int8 stacks the loader fills through empty_experts' views
    are already in the grouped matmuls' layout, so prepare_experts keeps their memory (emulation: host = device)."""
    views = backend.empty_experts(3, 32, 64, torch.int8, torch.device("cpu"))
    views.w13.copy_(torch.randint(-128, 128, views.w13.shape, dtype=torch.int8))
    views.w2.copy_(torch.randint(-128, 128, views.w2.shape, dtype=torch.int8))
    w = W8A8ExpertWeights(w13=views.w13, w13_scale=torch.rand(3, 128), w2=views.w2, w2_scale=torch.rand(3, 32))
    prepared = backend.prepare_experts(w)
    assert prepared.w13.data_ptr() == views.w13.data_ptr() and prepared.w2.data_ptr() == views.w2.data_ptr()
    assert torch.equal(prepared.w13, views.w13.transpose(1, 2)) and prepared.w13.is_contiguous()
    assert torch.equal(prepared.w2, views.w2.transpose(1, 2)) and prepared.w2.is_contiguous()


def test_w8a8_is_declared():
    assert AscendBackend.capabilities.w8a8


# ---- check_model -----------------------------------------------------------------------------------------------

M2 = dict(hidden_size=3072, num_heads=48, num_kv_heads=8, head_dim=128, rotary_dim=64, num_experts=256, top_k=8,
          intermediate_size=1536, vocab_size=200064, dtype=torch.bfloat16, kv_block_size=128, fp8_block=(128, 128))


def test_minimax_m2_passes_on_hardware_limits():
    model_limits.check_model(ModelSpec(**M2), (128,), float32_attention=False)


REFUSALS = {
    "float32 on an NPU": (dict(dtype=torch.float32), "float16/bfloat16 only"),
    "head_dim 256": (dict(head_dim=256), "head_dim 256"),
    "too many heads": (dict(num_heads=512, num_kv_heads=8), "at most 256"),
    "GQA ratio 96": (dict(num_heads=96, num_kv_heads=1), "ratio"),
    "heads not a multiple": (dict(num_heads=12, num_kv_heads=8), "multiple"),
    "block size 16": (dict(kv_block_size=16), "block size 16"),
    "2048 experts": (dict(num_experts=2048), "1024 groups"),
    "2 experts": (dict(num_experts=2, top_k=1), "more than 2 experts"),
    "top_k 0": (dict(top_k=0), "top_k 0"),
    "top_k beyond experts": (dict(num_experts=8, top_k=9), "top_k 9"),
    "hidden 65536": (dict(hidden_size=65536), "65536"),
    "odd rotary dim": (dict(rotary_dim=63), "rotary_dim 63"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_check_model_refuses_with_one_line_naming_the_limit(case):
    change, message = REFUSALS[case]
    with pytest.raises(UnsupportedModelError, match=message) as info:
        model_limits.check_model(ModelSpec(**{**M2, **change}), (128,), float32_attention=False)
    assert "\n" not in str(info.value) and str(info.value).startswith("ascend: ")


def test_emulated_backend_accepts_float32_and_padded_head_dims():
    backend = AscendBackend({"emulate": True}, torch.float32)
    backend.check_model(ModelSpec(**{**M2, "dtype": torch.float32, "head_dim": 32, "rotary_dim": 16}))
    with pytest.raises(UnsupportedModelError, match="head_dim 200"):
        backend.check_model(ModelSpec(**{**M2, "head_dim": 200}))


# ---- setup: torch_npu missing, options, notice, the real-torch_npu path ------------------------------------------

def test_missing_torch_npu_is_one_clear_line():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here; test_blocked_torch_npu_is_one_clear_line covers this host")
    with pytest.raises(MoerunError) as info:
        AscendBackend({"emulate": False, "device": "npu:0"}, torch.bfloat16)
    _assert_missing_message(str(info.value))


def test_blocked_torch_npu_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail wherever this runs
    with pytest.raises(MoerunError) as info:
        AscendBackend({"emulate": False}, torch.bfloat16)
    _assert_missing_message(str(info.value))


def _assert_missing_message(message):
    assert "\n" not in message and message.startswith("ascend: cannot import torch_npu")
    torch_version = torch.__version__.split("+")[0]
    assert f"torch_npu=={torch_version}.*" in message and f"torch {torch_version}" in message
    assert "CANN" in message and "docs/ascend.md" in message and "ascend.emulate: true" in message


def test_yaml_options_are_validated(tmp_path):
    base = {"backend": "ascend", "model": {"path": str(tmp_path), "dtype": "bfloat16"}}
    run = parse_run_config({**base, "ascend": {"emulate": True}}, tmp_path)
    assert run.backend_options == {"emulate": True, "device": "npu:0"}
    with pytest.raises(ConfigError, match="ascend.emulate: expected bool"):
        parse_run_config({**base, "ascend": {"emulate": "yes"}}, tmp_path)
    with pytest.raises(ConfigError, match="ascend.graph: unknown key"):
        parse_run_config({**base, "ascend": {"graph": True}}, tmp_path)
    with pytest.raises(ConfigError, match="block_size: 256 is not supported"):
        parse_run_config({**base, "kv_cache": {"block_size": 256}}, tmp_path)
    with pytest.raises(ConfigError, match="ascend.device: expected 'npu' or 'npu:N'"):
        AscendBackend({"emulate": True, "device": "cuda:0"}, torch.bfloat16)


def test_shipped_configs_parse_on_a_cpu_machine():
    emulated = load_run_config(REPO / "configs" / "ascend_demo_emulated.yaml")
    real = load_run_config(REPO / "configs" / "ascend_demo_npu.yaml")
    assert emulated.backend_options["emulate"] is True and emulated.dtype == torch.float32
    assert real.backend_options == {"emulate": False, "device": "npu:0"} and real.dtype == torch.bfloat16
    assert emulated.kv_block_size == real.kv_block_size == 128


def test_importing_the_backend_and_validating_yaml_never_imports_torch_npu():
    script = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name == "torch_npu" or name.startswith("torch_npu."):
                    raise AssertionError("torch_npu imported")
        sys.meta_path.insert(0, Refuse())
        import moerun.backends.ascend.backend
        from moerun.runtime.run_config import load_run_config
        load_run_config({str(REPO / 'configs' / 'ascend_demo_npu.yaml')!r})
        assert "torch_npu" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_emulation_is_announced_once_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(npu_ops, "_announced", False)
    first = AscendBackend({"emulate": True}, torch.float32)
    AscendBackend({"emulate": True}, torch.bfloat16)
    err = capsys.readouterr().err
    assert err.count("ascend.emulate is on") == 1 and "CPU" in err
    assert first.device == torch.device("cpu") and "emulated" in first.describe()
    first.synchronize()


def fake_torch_npu(devices):
    calls = []
    module = types.ModuleType("torch_npu")
    module.__version__ = "2.13.0"
    module.npu = types.SimpleNamespace(device_count=lambda: devices, set_device=calls.append)
    return module, calls


def test_real_torch_npu_path_selects_the_device(monkeypatch):
    module, calls = fake_torch_npu(devices=2)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    source = npu_ops.load(emulate=False, device="npu:1")
    assert source.ops is module and source.device == "npu:1" and calls == [1]
    assert not source.float32_attention and "torch_npu 2.13.0" in source.label


def test_real_torch_npu_without_that_device_is_one_line(monkeypatch):
    module, _ = fake_torch_npu(devices=1)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    with pytest.raises(MoerunError, match=r"sees 1 NPU\(s\).*npu-smi") as info:
        npu_ops.load(emulate=False, device="npu:3")
    assert "\n" not in str(info.value)
