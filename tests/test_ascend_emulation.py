"""The torch_npu emulation, op by op, against independent plain-PyTorch computations of the documented math
(written differently: per-token loops, SDPA, complex rotations, Python sorting), and every documented constraint
the backend could trip: a violating call must raise, as the NPU would fail (or silently corrupt) on it."""

from __future__ import annotations

import inspect
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from moerun.backends.ascend import emulation as npu
from moerun.backends.ascend.emulation import ConstraintError, NotEmulatedError

gen = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


# ---- signatures: names, order, keyword-only marker and defaults as torch_npu 2.13 documents them ------------------

DOCUMENTED = {
    "npu_fused_infer_attention_score": (
        "query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None, "
        "dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None, "
        "antiquant_scale=None, antiquant_offset=None, block_table=None, query_padding_size=None, kv_padding_size=None, "
        "key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None, value_antiquant_offset=None, "
        "key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None, key_rope=None, "
        "key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, "
        "input_layout='BSH', num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0, antiquant_mode=0, "
        "softmax_lse_flag=False, key_antiquant_mode=0, value_antiquant_mode=0"),
    "npu_scatter_pa_kv_cache": ("key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None, "
                                "compress_seq_offsets=None, seq_lens=None, cache_mode='PA_NZ'"),
    "npu_moe_gating_top_k": ("x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1, "
                             "group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0, "
                             "eps=1e-20"),
    "npu_moe_init_routing_v2": ("x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1, "
                                "expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False, "
                                "quant_mode=-1, active_expert_range=[], row_idx_type=0"),
    "npu_moe_token_unpermute": "permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None",
    "npu_rms_norm": "self, gamma, epsilon=1e-06",
    "npu_add_rms_norm": "x1, x2, gamma, epsilon=1e-06",
    "npu_swiglu": "self, dim=-1",
    "npu_rotary_mul": "input, r1, r2, rotary_mode='half', rotate=None",
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_signature_matches_torch_npu_docs(name):
    assert str(inspect.signature(getattr(npu, name))) == f"({DOCUMENTED[name]})"


def test_grouped_matmul_signature_keeps_the_documented_keywords():
    params = inspect.signature(npu.npu_grouped_matmul).parameters
    assert list(params)[:2] == ["x", "weight"]
    for name, default in dict(bias=None, scale=None, group_list=None, split_item=0, group_list_type=0, act_type=0,
                              output_dtype=None).items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default


# ---- npu_fused_infer_attention_score: TND queries over a paged cache -----------------------------------------------

BLOCK = 128
HEAD_DIM = 128


def paged_case(q_lens, kv_lens, heads=8, kv_heads=2, dim=HEAD_DIM, dtype=torch.float32, spare_blocks=3):
    """Random K/V in a (blocks, block_size, kv_heads*dim) cache; each sequence owns shuffled, non-contiguous blocks."""
    used = [math.ceil(n / BLOCK) for n in kv_lens]
    num_blocks = sum(used) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(used) + 1  # padded with 0 past each sequence's blocks, as the runtime does
    tables, at = [], 0
    for n in used:
        tables.append(ids[at:at + n] + [0] * (width - n))
        at += n
    key = randn(num_blocks, BLOCK, kv_heads * dim, dtype=dtype)
    value = randn(num_blocks, BLOCK, kv_heads * dim, dtype=dtype)
    query = randn(sum(q_lens), heads, dim, dtype=dtype)
    return query, key, value, torch.tensor(tables, dtype=torch.int32)


def reference_attention(query, key, value, tables, q_lens, kv_lens, kv_heads, scale):
    """Per sequence: read K/V token by token through the block table, then SDPA with an explicit boolean mask."""
    dim = query.shape[-1]
    outs, start = [], 0
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        k = torch.stack([key[tables[b, p // BLOCK], p % BLOCK].view(kv_heads, dim) for p in range(kv_len)])
        v = torch.stack([value[tables[b, p // BLOCK], p % BLOCK].view(kv_heads, dim) for p in range(kv_len)])
        q = query[start:start + q_len]
        positions = torch.arange(kv_len - q_len, kv_len)  # the new tokens are the last q_len of the sequence
        allowed = torch.arange(kv_len)[None, :] <= positions[:, None]
        o = F.scaled_dot_product_attention(q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None],
                                           v.double().transpose(0, 1)[None], attn_mask=allowed, scale=scale,
                                           enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += q_len
    return torch.cat(outs)


def fia(query, key, value, tables, q_lens, kv_lens, heads=8, kv_heads=2, **overrides):
    args = dict(atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1),
                actual_seq_lengths=torch.tensor(q_lens).cumsum(0).tolist(), actual_seq_lengths_kv=list(kv_lens),
                block_table=tables, num_heads=heads, num_key_value_heads=kv_heads, scale=0.1,
                input_layout="TND", sparse_mode=3, block_size=BLOCK)
    args.update(overrides)
    return npu.npu_fused_infer_attention_score(query, key, value, **args)


# prefill of whole sequences, a 3-token chunk at the end of a cached prefix, decodes; KV spans 1-3 blocks
MIXED = dict(q_lens=[5, 3, 1, 1, 2], kv_lens=[5, 130, 1, 300, 256])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fia_paged_tnd_ragged_mixed_batch_gqa(dtype, tol):
    query, key, value, tables = paged_case(**MIXED, dtype=dtype)
    out, lse = fia(query, key, value, tables, **MIXED, softmax_lse_flag=True)
    ref = reference_attention(query, key, value, tables, **MIXED, kv_heads=2, scale=0.1)
    assert out.dtype == dtype and out.shape == query.shape
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    # softmax_lse: log-sum-exp of the scaled, masked scores of each row (query 0 of sequence 0 sees one key)
    k0 = key[tables[0, 0], 0].view(2, HEAD_DIM).double()
    expected = (query[0].double() * 0.1) @ k0.repeat_interleave(4, 0).T
    assert torch.allclose(lse[0, :, 0].double(), torch.diagonal(expected), atol=tol * 10)
    assert lse.shape == (sum(MIXED["q_lens"]), 8, 1) and lse.dtype == torch.float32


def test_fia_without_lse_flag_returns_a_zero_placeholder():
    query, key, value, tables = paged_case([1], [3])
    _, lse = fia(query, key, value, tables, [1], [3])
    assert lse.shape == (1,) and lse.item() == 0


def test_fia_packed_tnd_reads_cumulative_kv_lengths():
    """Without a block table, K/V are packed like the query and actual_seq_lengths_kv is cumulative."""
    q_lens, kv_lens = [4, 2], [4, 7]
    query, key, value, tables = paged_case(q_lens, kv_lens)
    ref = reference_attention(query, key, value, tables, q_lens, kv_lens, kv_heads=2, scale=0.1)
    dense = lambda cache: torch.cat([torch.stack([cache[tables[b, p // BLOCK], p % BLOCK].view(2, HEAD_DIM)  # noqa: E731
                                                  for p in range(n)]) for b, n in enumerate(kv_lens)])
    out, _ = fia(query, dense(key), dense(value), None, q_lens, [4, 11], block_size=0)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fia_leaves_rows_past_the_last_length_undefined():
    query, key, value, tables = paged_case([2, 1], [2, 5])
    padded = torch.cat([query, randn(3, 8, HEAD_DIM)])  # 3 trailing rows no sequence owns
    out, _ = fia(padded, key, value, tables, [2, 1], [2, 5])
    assert torch.isfinite(out[:3]).all() and torch.isnan(out[3:]).all()


def test_fia_batch_entries_without_query_tokens_are_skipped():
    query, key, value, tables = paged_case([0, 2, 0], [4, 6, 1])
    out, _ = fia(query, key, value, tables, [0, 2, 0], [4, 6, 1])
    ref = reference_attention(query, key, value, tables[1:2], [2], [6], kv_heads=2, scale=0.1)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fia_head_dim_192_and_mha():
    query, key, value, tables = paged_case([3], [3], heads=2, kv_heads=2, dim=192)
    out, _ = fia(query, key, value, tables, [3], [3], heads=2, kv_heads=0)  # 0 = as many KV heads as query heads
    ref = reference_attention(query, key, value, tables, [3], [3], kv_heads=2, scale=0.1)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fia_left_up_causal_mode_2():
    query, key, value, tables = paged_case([3], [6])
    out, _ = fia(query, key, value, tables, [3], [6], sparse_mode=2)
    ref = reference_attention(query, key, value, tables, [3], [3], kv_heads=2, scale=0.1)  # sees keys 0..i only
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def _fia_violation(q_lens=(2, 1), kv_lens=(2, 140), dim=HEAD_DIM, heads=8, transform=None, **overrides):
    """An FIA call with one thing changed: a keyword override, or `transform` applied to the tensors dict."""
    kv_heads = overrides.get("num_key_value_heads", 2)
    query, key, value, tables = paged_case(list(q_lens), list(kv_lens), heads=heads, kv_heads=kv_heads, dim=dim)
    tensors = dict(query=query, key=key, value=value, tables=tables)
    if transform:
        transform(tensors)
    overrides.setdefault("num_heads", heads)
    return lambda: fia(tensors["query"], tensors["key"], tensors["value"], tensors["tables"], list(q_lens),
                       list(kv_lens), heads=heads, **overrides)


def _replace(name, fn):
    return lambda t: t.update({name: fn(t[name])})


FIA_VIOLATIONS = {
    "missing actual_seq_lengths_kv": (dict(actual_seq_lengths_kv=None), "actual_seq_lengths_kv"),
    "missing actual_seq_lengths": (dict(actual_seq_lengths=None), "actual_seq_lengths"),
    "query lengths not cumulative": (dict(q_lens=[2, 1], actual_seq_lengths=[2, 1]), "cumulative"),
    "cumulative kv lengths with a block table": (dict(kv_lens=(300, 250), actual_seq_lengths_kv=[300, 550]),
                                                 "own KV length"),
    "kv lengths count differs from batch": (dict(actual_seq_lengths_kv=[2]), "batch"),
    "head dim 64 in TND": (dict(dim=64), "head dim 128 or 192"),
    "GQA ratio above 64": (dict(heads=65, num_key_value_heads=1), "<= 64"),
    "heads not a multiple of KV heads": (dict(heads=6, num_key_value_heads=4), "multiple"),
    "num_heads differs from query": (dict(num_heads=4), "num_heads"),
    "block size 64 with prefill": (dict(block_size=64), "multiple of 128"),
    "block size differs from cache": (dict(block_size=256), "block size"),
    "block table int64": (dict(transform=_replace("tables", lambda t: t.long())), "int32"),
    "block id outside the cache": (dict(transform=_replace("tables", lambda t: t.fill_(999))), "outside"),
    "mask of the wrong shape": (dict(atten_mask=torch.zeros(16, 16, dtype=torch.int8)), "2048"),
    "inverted mask": (dict(atten_mask=torch.tril(torch.ones(2048, 2048, dtype=torch.int8))), "above the diagonal"),
    "float mask": (dict(atten_mask=torch.triu(torch.ones(2048, 2048), 1)), "dtype"),
    "causal mode without mask": (dict(atten_mask=None), "requires the compressed atten_mask"),
    "unsupported sparse mode": (dict(sparse_mode=5), "sparse_mode"),
    "unknown layout": (dict(input_layout="TNDX"), "unknown"),
    "float64 query": (dict(transform=_replace("query", lambda q: q.double())), "dtype"),
    "key dtype differs": (dict(transform=lambda t: t.update(key=t["key"].bfloat16(), value=t["value"].bfloat16())),
                          "dtype"),
    "non-contiguous query": (dict(transform=_replace("query", lambda q: q.transpose(0, 1).contiguous().transpose(0, 1))),
                             "contiguous"),
    "2-D paged cache": (dict(transform=lambda t: t.update(key=t["key"].flatten(0, 1), value=t["value"].flatten(0, 1))),
                        "paged key/value"),
    "inner_precise 2 in decode": (dict(q_lens=[1, 1], actual_seq_lengths=[1, 2], inner_precise=2), "inner_precise"),
}


@pytest.mark.parametrize("case", sorted(FIA_VIOLATIONS))
def test_fia_constraint_violations_raise(case):
    change, message = FIA_VIOLATIONS[case]
    with pytest.raises(ConstraintError, match=message):
        _fia_violation(**dict(change))()


def _as_bnnbsd(t):
    for name in ("key", "value"):
        t[name] = t[name].view(t[name].shape[0], BLOCK, 2, HEAD_DIM).transpose(1, 2).contiguous()


@pytest.mark.parametrize("change", [dict(input_layout="BSH"), dict(sparse_mode=1), dict(sparse_mode=4),
                                    dict(sparse_mode=0), dict(quant_scale2=torch.ones(1)),
                                    dict(query_rope=torch.ones(1)), dict(transform=_as_bnnbsd)],
                         ids=["BSH", "full mask", "band", "explicit mask in mode 0", "quantized", "MLA rope",
                              "BnNBsD cache"])
def test_fia_features_outside_moerun_are_not_emulated(change):
    with pytest.raises(NotEmulatedError):
        _fia_violation(**change)()


# ---- npu_scatter_pa_kv_cache (cache_mode "Norm") -------------------------------------------------------------------

def test_scatter_pa_kv_cache_writes_each_token_at_its_slot():
    key_cache, value_cache = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    key, value = randn(7, 2, 8), randn(7, 2, 8)
    slots = torch.tensor([0, 15, 16, 63, 40, 33, 5])
    npu.npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slots, cache_mode="Norm")
    expected_k, expected_v = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    for t, s in enumerate(slots.tolist()):
        expected_k[s // 16, s % 16], expected_v[s // 16, s % 16] = key[t], value[t]
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def test_scatter_pa_kv_cache_accepts_int32_slots_and_separate_value_head_size():
    key_cache, value_cache = torch.zeros(2, 16, 1, 8), torch.zeros(2, 16, 1, 4)
    npu.npu_scatter_pa_kv_cache(torch.ones(2, 1, 8), torch.ones(2, 1, 4), key_cache, value_cache,
                                torch.tensor([3, 17], dtype=torch.int32), cache_mode="Norm")
    assert key_cache[0, 3].sum() == 8 and value_cache[1, 1].sum() == 4 and key_cache.sum() == 16


def _scatter_call(**change):
    args = dict(key=randn(3, 2, 8), value=randn(3, 2, 8), key_cache=torch.zeros(2, 16, 2, 8),
                value_cache=torch.zeros(2, 16, 2, 8), slot_mapping=torch.tensor([1, 2, 3]), cache_mode="Norm")
    args.update(change)
    return lambda: npu.npu_scatter_pa_kv_cache(args.pop("key"), args.pop("value"), args.pop("key_cache"),
                                               args.pop("value_cache"), args.pop("slot_mapping"), **args)


@pytest.mark.parametrize("change,message", [
    (dict(slot_mapping=torch.tensor([1, 1, 3])), "unique"),
    (dict(slot_mapping=torch.tensor([1, 2, 32])), r"\[0, 31\]"),
    (dict(slot_mapping=torch.tensor([1.0, 2.0, 3.0])), "dtype"),
    (dict(key=randn(2, 3, 8).transpose(0, 1)), "contiguous"),
    (dict(value=randn(3, 2, 8).double()), "dtype"),
    (dict(key_cache=torch.zeros(2, 16, 16), value_cache=torch.zeros(2, 16, 16)), "4-D"),
    (dict(cache_mode="ND"), "unknown"),
], ids=["duplicate slots", "slot out of range", "float slots", "non-contiguous key", "dtype mismatch", "3-D cache",
        "unknown mode"])
def test_scatter_pa_kv_cache_constraints(change, message):
    with pytest.raises(ConstraintError, match=message):
        _scatter_call(**change)()


def test_scatter_pa_kv_cache_default_nz_mode_is_not_an_nd_write():
    """The default cache_mode is 'PA_NZ' (FRACTAL_NZ caches): forgetting cache_mode='Norm' must not pass."""
    with pytest.raises(NotEmulatedError, match="PA_NZ"):
        npu.npu_scatter_pa_kv_cache(randn(1, 2, 8), randn(1, 2, 8), torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8),
                                    torch.tensor([0]))


# ---- npu_moe_gating_top_k ------------------------------------------------------------------------------------------

def python_gating(x, k, bias, norm_type=1, group_count=1, k_group=1, group_select_mode=0, scaling=1.0):
    """Row by row with Python lists: scores, biased choice, optional group pruning, sort by (-choice, id)."""
    ids, weights = [], []
    for row in x.double().tolist():
        if norm_type == 1:
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        choice = [a + b for a, b in zip(s, bias.double().tolist())]
        size = len(row) // group_count
        if group_count > 1:
            groups = [choice[g * size:(g + 1) * size] for g in range(group_count)]
            score = [max(g) if group_select_mode == 0 else sum(sorted(g)[-2:]) for g in groups]
            kept = sorted(range(group_count), key=lambda g: (-score[g], g))[:k_group]
            choice = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        top = sorted(range(len(row)), key=lambda e: (-choice[e], e))[:k]
        w = [s[e] for e in top]
        if norm_type == 1:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        ids.append(top)
        weights.append([v * scaling for v in w])
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float64)


def test_gating_sigmoid_bias_selects_unbiased_weights_renormalized():
    x, bias = randn(9, 16), 0.5 * randn(16)
    y, idx, _ = npu.npu_moe_gating_top_k(x, 4, bias=bias, norm_type=1)
    ref_ids, ref_w = python_gating(x, 4, bias)
    assert idx.dtype == torch.int32 and y.dtype == torch.float32
    assert torch.equal(idx.long(), ref_ids)
    assert torch.allclose(y.double(), ref_w, atol=1e-6)


def test_gating_ties_go_to_the_lower_expert_id():
    x = torch.zeros(2, 8)
    x[1, [5, 2, 7]] = 3.0
    _, idx, _ = npu.npu_moe_gating_top_k(x, 3, bias=torch.zeros(8), norm_type=1)
    assert idx.tolist() == [[0, 1, 2], [2, 5, 7]]


@pytest.mark.parametrize("mode", [0, 1])
def test_gating_groups_softmax_and_scaling(mode):
    x, bias = randn(6, 32), 0.1 * randn(32)
    y, idx, norm_out = npu.npu_moe_gating_top_k(x, 3, bias=bias, k_group=2, group_count=4, group_select_mode=mode,
                                                norm_type=0, out_flag=True, routed_scaling_factor=2.5)
    ref_ids, ref_w = python_gating(x, 3, bias, norm_type=0, group_count=4, k_group=2, group_select_mode=mode, scaling=2.5)
    assert torch.equal(idx.long(), ref_ids) and torch.allclose(y.double(), ref_w, atol=1e-6)
    assert torch.allclose(norm_out, torch.softmax(x, -1))


def test_gating_norm_out_is_undefined_without_out_flag():
    _, _, norm_out = npu.npu_moe_gating_top_k(randn(2, 8), 2, bias=torch.zeros(8), norm_type=1)
    assert torch.isnan(norm_out).all()


@pytest.mark.parametrize("change,message", [
    (dict(renorm=1), "renorm only supports 0"),
    (dict(bias=torch.zeros(16, dtype=torch.bfloat16)), "bias dtype"),
    (dict(bias=torch.zeros(8)), "bias must be"),
    (dict(x=randn(2, 3, 16)), "2-D"),
    (dict(x=randn(2, 2100), bias=torch.zeros(2100)), "at most 2048"),
    (dict(k=17), "k must lie"),
    (dict(k=0), "k must lie"),
    (dict(group_count=3), "groups"),
    (dict(group_count=8), "per group must be > 2"),
    (dict(x=randn(2, 16).double(), bias=torch.zeros(16).double()), "dtype"),
], ids=["renorm", "bias dtype", "bias shape", "3-D x", "too many experts", "k too large", "k zero",
        "uneven groups", "two experts per group", "float64"])
def test_gating_constraints(change, message):
    args = dict(x=randn(2, 16), k=2, bias=torch.zeros(16), norm_type=1)
    args.update(change)
    with pytest.raises(ConstraintError, match=message):
        npu.npu_moe_gating_top_k(args.pop("x"), args.pop("k"), **args)


def test_gating_hash_routing_is_not_emulated():
    with pytest.raises(NotEmulatedError):
        npu.npu_moe_gating_top_k(randn(2, 8), 2, input_ids=torch.zeros(2, dtype=torch.int32))


# ---- npu_moe_init_routing_v2 ---------------------------------------------------------------------------------------

def python_init_routing(x, ids, start, end):
    """Pairs f = t*K + j sorted by (expert, f) with out-of-range experts dropped: rows, gather index, counts."""
    top_k = ids.shape[1]
    flat = ids.flatten().tolist()
    valid = sorted((e, f) for f, e in enumerate(flat) if start <= e < end)
    rows = torch.stack([x[f // top_k] for _, f in valid]) if valid else x[:0]
    index = [-1] * len(flat)
    for i, (_, f) in enumerate(valid):
        index[f] = i
    counted = Counter(e for e, _ in valid)
    return rows, torch.tensor(index, dtype=torch.int32), torch.tensor([counted[e] for e in range(start, end)])


ROUTINGS = {
    "every expert hit": torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 3, 5], [7, 6, 2]]),
    "some experts get none": torch.tensor([[6, 1, 4], [1, 6, 4], [4, 1, 6], [6, 4, 1], [1, 4, 6]]),
    "one expert takes all": torch.full((5, 3), 3),
    "random": torch.randint(0, 8, (13, 3), generator=gen),
}


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_init_routing_sorts_pairs_token_major_and_counts(name):
    ids = ROUTINGS[name].to(torch.int32)
    x = randn(ids.shape[0], 6)
    expanded, index, counts, _ = npu.npu_moe_init_routing_v2(
        x, ids, active_num=ids.numel(), expert_num=8, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, 8], quant_mode=-1, row_idx_type=0)
    rows, ref_index, ref_counts = python_init_routing(x, ids, 0, 8)
    assert expanded.shape == (ids.numel(), 6) and torch.equal(expanded, rows)
    assert index.dtype == torch.int32 and torch.equal(index, ref_index)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)


def test_init_routing_partial_expert_range_drops_pairs_to_the_end():
    ids = ROUTINGS["random"].to(torch.int32)
    x = randn(ids.shape[0], 6)
    expanded, index, counts, _ = npu.npu_moe_init_routing_v2(
        x, ids, expert_num=8, expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[2, 6])
    rows, ref_index, ref_counts = python_init_routing(x, ids, 2, 6)
    n = rows.shape[0]
    assert torch.equal(expanded[:n], rows) and torch.isnan(expanded[n:]).all()  # the tail is never written
    assert torch.equal(index, ref_index) and (index == -1).sum() == ids.numel() - n
    assert torch.equal(counts, ref_counts) and counts.shape == (4,)


def test_init_routing_int8_rows_and_the_unquantized_scale():
    ids = ROUTINGS["random"].to(torch.int32)
    x = torch.randint(-100, 100, (ids.shape[0], 4), generator=gen).to(torch.int8)
    scale = torch.rand(ids.shape[0], generator=gen)
    expanded, _, _, expanded_scale = npu.npu_moe_init_routing_v2(
        x, ids, scale=scale, expert_num=8, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, 4])
    rows, _, _ = python_init_routing(x, ids, 0, 4)
    n = rows.shape[0]
    assert torch.equal(expanded[:n], rows) and (expanded[n:] == -128).all()  # unwritten int8 rows
    order = sorted((e, f) for f, e in enumerate(ids.flatten().tolist()) if e < 4)
    assert torch.equal(expanded_scale[:n], torch.stack([scale[f // 3] for _, f in order]))


def test_init_routing_scatter_index_and_key_value_counts():
    ids = ROUTINGS["some experts get none"].to(torch.int32)
    _, scatter, pairs, _ = npu.npu_moe_init_routing_v2(
        randn(5, 4), ids, expert_num=8, expert_tokens_num_type=2, expert_tokens_num_flag=True,
        row_idx_type=1)  # no active_expert_range: all of [0, expert_num)
    flat = ids.flatten().tolist()
    assert scatter.tolist() == sorted(range(15), key=lambda f: (flat[f], f))
    assert pairs.tolist() == [[1, 5], [4, 5], [6, 5]] + [[0, 0]] * 5


@pytest.mark.parametrize("change,message", [
    (dict(expert_tokens_num_type=0), "only supports 1"),
    (dict(expert_tokens_num_flag=False), "only supports True"),
    (dict(drop_pad_mode=1), "drop_pad_mode"),
    (dict(quant_mode=0), "static"),
    (dict(expert_idx=torch.tensor([[0, 8]], dtype=torch.int32)), "< expert_num"),
    (dict(expert_idx=torch.tensor([[0, 1]])), "dtype"),
    (dict(expert_num=10241, active_expert_range=[0, 8]), r"\[1, 10240\]"),
    (dict(active_expert_range=[6, 2]), "increasing"),
    (dict(active_expert_range=[0, 9]), "must not exceed"),
    (dict(x=randn(1, 2, 4)), "2-D"),
    (dict(expert_num=-1, active_expert_range=[]), "pass expert_num"),
], ids=["cumsum counts", "no count flag", "drop pad", "static quant", "expert id too large", "int64 ids",
        "expert_num too large", "decreasing range", "range beyond experts", "3-D x", "no experts given"])
def test_init_routing_constraints(change, message):
    args = dict(x=randn(1, 4), expert_idx=torch.tensor([[0, 1]], dtype=torch.int32), expert_num=8,
                expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, 8])
    args.update(change)
    with pytest.raises(ConstraintError, match=message):
        npu.npu_moe_init_routing_v2(args.pop("x"), args.pop("expert_idx"), **args)


def test_init_routing_dynamic_quant_is_not_emulated():
    with pytest.raises(NotEmulatedError):
        npu.npu_moe_init_routing_v2(randn(1, 4), torch.tensor([[0]], dtype=torch.int32), expert_num=2,
                                    expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=1)


# ---- npu_grouped_matmul ------------------------------------------------------------------------------------------

def python_grouped(x, w, counts):
    """Row by row: the group of row r is the first expert whose running row count exceeds r."""
    ends = torch.tensor(counts).cumsum(0).tolist()
    out = torch.empty(x.shape[0], w.shape[-1], dtype=torch.float64)
    for r in range(x.shape[0]):
        g = next(e for e, end in enumerate(ends) if end > r)
        out[r] = x[r].double() @ w[g].double()
    return out


COUNTS = [3, 0, 5, 0, 0, 2, 1, 4]  # experts 1, 3, 4 get no rows


@pytest.mark.parametrize("list_type", [0, 1], ids=["cumsum", "count"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_grouped_matmul_single_stacked_weight(list_type, dtype, tol):
    x, w = randn(sum(COUNTS), 16, dtype=dtype), randn(8, 16, 12, dtype=dtype)
    group_list = torch.tensor(COUNTS).cumsum(0) if list_type == 0 else torch.tensor(COUNTS)
    (y,) = npu.npu_grouped_matmul([x], [w], group_list=group_list, split_item=2, group_type=0, group_list_type=list_type)
    ref = python_grouped(x, w, COUNTS)
    assert y.dtype == dtype and (y.double() - ref).abs().max() <= tol * ref.abs().max()


def test_grouped_matmul_transposed_weight_view_and_weight_list():
    x, w_nk = randn(sum(COUNTS), 16), randn(8, 12, 16)
    ref = python_grouped(x, w_nk.transpose(1, 2), COUNTS)
    (y,) = npu.npu_grouped_matmul([x], [w_nk.transpose(1, 2)], group_list=torch.tensor(COUNTS), split_item=3,
                                  group_type=0, group_list_type=1)
    (y_list,) = npu.npu_grouped_matmul([x], list(w_nk.transpose(1, 2).unbind(0)), group_list=torch.tensor(COUNTS),
                                       split_item=2, group_type=0, group_list_type=1)
    assert torch.allclose(y.double(), ref, atol=1e-5) and torch.allclose(y_list.double(), ref, atol=1e-5)


def test_grouped_matmul_ungrouped_lists():
    xs, ws = [randn(3, 4), randn(5, 6)], [randn(4, 2), randn(6, 7)]
    ys = npu.npu_grouped_matmul(xs, ws, split_item=0)
    assert all(torch.allclose(y, x @ w, atol=1e-6) for y, x, w in zip(ys, xs, ws))


def _gmm(**change):
    args = dict(x=[randn(4, 8)], weight=[randn(2, 8, 3)], group_list=torch.tensor([1, 3]), split_item=2, group_type=0,
                group_list_type=1)
    args.update(change)
    return lambda: npu.npu_grouped_matmul(args.pop("x"), args.pop("weight"), **args)


@pytest.mark.parametrize("change,message", [
    (dict(weight=[randn(1025, 8, 1)], group_list=torch.tensor([4] + [0] * 1024)), "at most 1024 groups"),
    (dict(group_list=torch.tensor([1, 2])), "sum to M"),
    (dict(group_list=torch.tensor([3, 1]), group_list_type=0), "non-decreasing"),
    (dict(group_list=torch.tensor([1, 3]), group_list_type=0), "end at M"),
    (dict(group_list=torch.tensor([1, 3], dtype=torch.int32)), "int64"),
    (dict(group_list=torch.tensor([1, 1, 2])), "entries"),
    (dict(split_item=0), "split_item 2 or 3"),
    (dict(x=[randn(8, 4).T]), "transposed"),
    (dict(x=[randn(4, 8).bfloat16()]), "share one dtype"),
    (dict(group_list_type=2), "int8"),
    (dict(x=[torch.zeros(1, 65536, dtype=torch.float16)], weight=[torch.zeros(1, 65536, 1, dtype=torch.float16)],
          group_list=torch.tensor([1])), "< 65536"),
], ids=["too many groups", "counts off", "cumsum decreasing", "cumsum short", "int32 group list", "group count",
        "split item", "transposed x", "dtype mix", "group list type 2", "inner limit"])
def test_grouped_matmul_constraints(change, message):
    with pytest.raises(ConstraintError, match=message):
        _gmm(**change)()


@pytest.mark.parametrize("change", [dict(scale=[torch.ones(3)]), dict(group_type=2)], ids=["quantized", "K grouping"])
def test_grouped_matmul_features_outside_moerun_are_not_emulated(change):
    with pytest.raises(NotEmulatedError):
        _gmm(**change)()


# ---- npu_swiglu, npu_moe_token_unpermute -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_swiglu_gates_with_the_first_half(dtype, tol):
    x = randn(5, 2, 12, dtype=dtype)
    out = npu.npu_swiglu(x, dim=-1)
    gate, up = x.double()[..., :6], x.double()[..., 6:]
    ref = gate / (1 + torch.exp(-gate)) * up
    assert out.dtype == dtype and (out.double() - ref).abs().max() <= tol * ref.abs().max()
    swapped = up / (1 + torch.exp(-up)) * gate  # gate second would be a different function
    assert (swapped - ref).abs().max() > 10 * tol
    along_0 = npu.npu_swiglu(randn(4, 3), dim=0)
    assert along_0.shape == (2, 3)


@pytest.mark.parametrize("x,message", [(randn(2, 5), "even"), (randn(6, 4).T, "contiguous"),
                                       (torch.zeros(0, 4), "empty"), (torch.ones(2, 4, dtype=torch.int32), "dtype")],
                         ids=["odd split", "non-contiguous", "empty", "int"])
def test_swiglu_constraints(x, message):
    with pytest.raises(ConstraintError, match=message):
        npu.npu_swiglu(x)


def test_token_unpermute_weighted_sum_over_each_tokens_k_rows():
    tokens, top_k = 6, 3
    permuted = randn(tokens * top_k, 5)
    index = torch.randperm(tokens * top_k, generator=gen).to(torch.int32)
    probs = torch.rand(tokens, top_k, generator=gen)
    out = npu.npu_moe_token_unpermute(permuted, index, probs=probs)
    for t in range(tokens):
        expected = sum(probs[t, j].double() * permuted[index[t * top_k + j]].double() for j in range(top_k))
        assert torch.allclose(out[t].double(), expected, atol=1e-6)
    without = npu.npu_moe_token_unpermute(permuted, index)  # no probs: K = 1, a pure gather
    assert torch.equal(without, permuted[index.long()])


@pytest.mark.parametrize("change,message", [
    (dict(sorted_indices=torch.tensor([0, 0, 1, 2], dtype=torch.int32)), "repeat"),
    (dict(sorted_indices=torch.tensor([0, 1, 2, 4], dtype=torch.int32)), r"\[0, 3\]"),
    (dict(sorted_indices=torch.arange(4)), "dtype"),
    (dict(padded_mode=True), "padded_mode"),
    (dict(restore_shape=[2, 3]), "restore_shape"),
    (dict(probs=torch.ones(4, 1), sorted_indices=torch.arange(4, dtype=torch.int32)), None),
    (dict(probs=torch.ones(1, 513), permuted_tokens=randn(513, 3), sorted_indices=torch.arange(513, dtype=torch.int32)),
     "<= 512"),
], ids=["repeated index", "index out of range", "int64 index", "padded", "restore shape", "k=1 is fine", "k too large"])
def test_token_unpermute_constraints(change, message):
    args = dict(permuted_tokens=randn(4, 3), sorted_indices=torch.arange(4, dtype=torch.int32), probs=torch.ones(2, 2))
    args.update(change)
    if message is None:
        npu.npu_moe_token_unpermute(**args)
        return
    with pytest.raises(ConstraintError, match=message):
        npu.npu_moe_token_unpermute(**args)


# ---- npu_rms_norm, npu_add_rms_norm ------------------------------------------------------------------------------

def reference_rms(x, gamma, eps, dims=1):
    flat = x.double().flatten(x.dim() - dims)
    rms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True) / math.sqrt(flat.shape[-1])
    return (flat / torch.sqrt(rms ** 2 + eps)).view(x.shape) * gamma.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_and_rstd(dtype, tol):
    x, gamma = 3 * randn(7, 32, dtype=dtype), randn(32, dtype=dtype)
    y, rstd = npu.npu_rms_norm(x, gamma, 1e-6)
    ref = reference_rms(x, gamma, 1e-6)
    assert y.dtype == dtype and (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert rstd.dtype == torch.float32 and rstd.shape == (7, 1)
    two_dims, _ = npu.npu_rms_norm(x.view(7, 4, 8), gamma.view(4, 8), 1e-6)  # gamma spans the trailing two dims
    assert (two_dims.view(7, 32).double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_add_rms_norm_returns_norm_rstd_and_sum(dtype, tol):
    x1, x2, gamma = randn(5, 16, dtype=dtype), randn(5, 16, dtype=dtype), randn(16, dtype=dtype)
    y, rstd, summed = npu.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-5)
    exact_sum = x1.double() + x2.double()
    assert torch.equal(summed, exact_sum.to(dtype))  # x1 + x2 rounded once
    ref = reference_rms(exact_sum, gamma, 1e-5)
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert rstd.shape == (5, 1) and rstd.dtype == torch.float32


@pytest.mark.parametrize("call,message", [
    (lambda: npu.npu_rms_norm(randn(2, 8), randn(8).bfloat16()), "gamma dtype"),
    (lambda: npu.npu_rms_norm(randn(2, 8), randn(4)), "trailing dims"),
    (lambda: npu.npu_add_rms_norm(randn(2, 8), randn(2, 4), randn(8)), "x2 shape"),
    (lambda: npu.npu_add_rms_norm(randn(2, 8), randn(2, 8).bfloat16(), randn(8)), "x2 dtype"),
    (lambda: npu.npu_rms_norm(randn(2, 8).double(), randn(8).double()), "dtype"),
], ids=["gamma dtype", "gamma shape", "x2 shape", "x2 dtype", "float64"])
def test_norm_constraints(call, message):
    with pytest.raises(ConstraintError, match=message):
        call()


# ---- npu_rotary_mul ----------------------------------------------------------------------------------------------

def angles(tokens, dim):
    freqs = torch.arange(tokens)[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))[None, :]
    return freqs  # [T, dim/2]


def test_rotary_mul_half_mode_is_a_complex_rotation_of_pairs_i_and_i_plus_half():
    tokens, heads, dim = 5, 3, 16
    theta = angles(tokens, dim)
    cos, sin = torch.cat((theta, theta), -1).cos(), torch.cat((theta, theta), -1).sin()
    x = randn(1, tokens, heads, dim)
    out = npu.npu_rotary_mul(x, cos.view(1, tokens, 1, dim), sin.view(1, tokens, 1, dim), rotary_mode="half")
    z = torch.complex(x[..., :dim // 2].double(), x[..., dim // 2:].double()) * torch.polar(
        torch.ones_like(theta).double(), theta.double())[None, :, None, :]
    assert torch.allclose(out, torch.cat((z.real, z.imag), -1).float(), atol=1e-5)


def test_rotary_mul_interleave_mode_rotates_adjacent_pairs():
    tokens, dim = 4, 8
    theta = angles(tokens, dim)
    cos = theta.repeat_interleave(2, -1).cos().view(tokens, 1, dim)
    sin = theta.repeat_interleave(2, -1).sin().view(tokens, 1, dim)
    x = randn(tokens, 2, dim)
    out = npu.npu_rotary_mul(x, cos, sin, rotary_mode="interleave")
    z = torch.view_as_complex(x.double().reshape(tokens, 2, dim // 2, 2).contiguous()) * torch.polar(
        torch.ones_like(theta).double(), theta.double())[:, None, :]
    assert torch.allclose(out, torch.view_as_real(z).reshape(tokens, 2, dim).float(), atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(x=randn(1, 4, 2, 7), r=0.5 * torch.ones(1, 4, 1, 7)), "even"),
    (dict(x=randn(1, 1, 1, 896), r=0.5 * torch.ones(1, 1, 1, 896)), "< 896"),
    (dict(x=randn(2, 4, 3, 8), r=0.5 * torch.ones(1, 4, 3, 8)), "supported pattern"),
    (dict(r=2 * torch.ones(1, 4, 1, 8)), r"\[-1, 1\]"),
    (dict(r=0.5 * torch.ones(1, 4, 1, 8).bfloat16()), "dtype"),
    (dict(rotary_mode="quarter"), "rotary_mode"),
    (dict(x=randn(4, 8)), "3-D"),
], ids=["odd D", "D too large", "unsupported broadcast", "coefficients beyond 1", "dtype mix", "quarter mode", "2-D"])
def test_rotary_mul_constraints(change, message):
    x, r = change.pop("x", randn(1, 4, 2, 8)), change.pop("r", 0.5 * torch.ones(1, 4, 1, 8))
    with pytest.raises(ConstraintError, match=message):
        npu.npu_rotary_mul(x, r, r, **change)


def test_rotary_mul_rotate_matrix_is_not_emulated():
    with pytest.raises(NotEmulatedError):
        npu.npu_rotary_mul(randn(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), rotate=torch.eye(4))
