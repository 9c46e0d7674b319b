"""The capacity arithmetic against hand counts, and MiniMax-M2.7's figures against MiniMax's published ones
(MiniMax-AI/MiniMax-M2 docs/vllm_deploy_guide.md: "220 GB for weights, 240 GB per 1M context tokens";
4 x 96 GB holds about 400K tokens, 8 x 144 GB about 3M)."""

from __future__ import annotations

import pytest
from m27_config import CONFIG

from moerun.backends.errors import ConfigError
from moerun.runtime import capacity
from moerun.runtime.capacity import Format
from moerun.runtime.devices import parse_devices
from moerun.runtime.model_config import parse_model_config
from moerun.runtime.shard_plan import ShardPlan

M27 = parse_model_config(CONFIG)
BF16 = Format("bfloat16", "bfloat16")
FP8 = Format("fp8", "bfloat16")


def within(value: float, published: float, tolerance: float = 0.10) -> bool:
    return abs(value - published) <= tolerance * published


def test_m27_whole_model_agrees_with_published_figures():
    weights = capacity.weight_bytes(M27, ShardPlan(), FP8).total
    kv = capacity.kv_bytes_per_token(M27, ShardPlan(), "bfloat16")
    assert kv == 62 * 2 * 8 * 128 * 2  # 253,952 B: 248 KiB per token
    assert within(weights, 220e9)
    assert within(kv * 1e6, 240e9)
    # bf16 (an FP8 checkpoint dequantized on Ascend): about twice, 458 GB
    assert within(capacity.weight_bytes(M27, ShardPlan(), BF16).total, 458e9, 0.02)


@pytest.mark.parametrize("devices,tp,published", [("96g:4", 4, 400_000), ("144g:8", 8, 3_000_000)])
def test_m27_kv_tokens_agree_with_published_figures(devices, tp, published):
    devs = parse_devices(devices)
    layouts = capacity.plan_layouts(M27, FP8, devs.memory, devs.count, 0.9, 2048, 256, accelerator=True,
                                    fp8_executed=True)
    chosen = next(p for p in layouts if (p.tp, p.ep) == (tp, devs.count))
    assert chosen.refused is None and within(chosen.kv_tokens, published)


def test_m27_fp8_rank_bytes_by_hand():
    """TP4 x EP4 on FP8: every tensor of one rank counted by hand."""
    plan = ShardPlan(world_size=4, rank=0, tp=4, ep=4)
    h, layers, blk = 3072, 62, 128
    q_rows, kv_rows = 12 * 128, 2 * 128
    fp8 = lambda rows, cols: rows * cols + 4 * (rows // blk) * (cols // blk)  # noqa: E731 (all M2 dims are block multiples)
    attention = fp8(q_rows, h) + 2 * fp8(kv_rows, h) + fp8(h, q_rows)
    experts = 64 * (fp8(2 * 1536, h) + fp8(h, 1536))
    norms = 2 * (2 * h + q_rows + kv_rows)  # bf16 input/post norms and this rank's q/k norm slices
    router = 4 * (256 * h + 256)
    vocabulary = 2 * 2 * (200064 // 4) * h  # embed + lm_head rows, bf16
    expected = layers * (attention + experts + norms + router) + vocabulary + 2 * h
    assert capacity.weight_bytes(M27, plan, FP8).total == expected
    assert capacity.kv_bytes_per_token(M27, plan, "bfloat16") == 62 * 2 * 2 * 128 * 2  # 63,488


def test_kv_tokens_by_hand():
    assert capacity.kv_tokens(memory=100, memory_fraction=0.5, weights=20, reserve=10, per_token=4) == 5
    assert capacity.kv_tokens(memory=100, memory_fraction=0.5, weights=60, reserve=0, per_token=4) < 0


def test_pure_tp8_on_fp8_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="intermediate 1536 / 8 = 192 is not a multiple of the FP8 block 128: "
                                          "use expert parallelism"):
        ShardPlan(world_size=8, rank=0, tp=8, ep=1).check(M27, (128, 128))
    # dequantized (bf16 on Ascend) the same split is exact, so allowed
    assert ShardPlan(world_size=8, rank=0, tp=8, ep=1).check(M27, None) == []


def test_tp_beyond_kv_heads_replicates_them_and_says_so():
    plan = ShardPlan(world_size=16, rank=5, tp=16, ep=16)
    notes = plan.check(M27, (128, 128))
    assert notes and "replicated on 2 ranks" in notes[0]
    assert len(plan.local_heads(48)) == 3 and plan.local_kv_heads(8) == range(2, 3)
    # both replicas of KV head 2 (ranks 4 and 5) hold it; only the first counts it in the QK-norm sum
    assert ShardPlan(16, 4, 16, 16).local_kv_heads(8) == plan.local_kv_heads(8)
    assert ShardPlan(16, 4, 16, 16).counts_kv_norm(8) and not plan.counts_kv_norm(8)


@pytest.mark.parametrize("world,tp,ep,message", [
    (8, 3, 8, "3 does not divide the world size 8"),
    (16, 16, 3, "3 does not divide the world size 16"),
    (6, 2, 6, "expert_parallel_size: 6 does not divide the 256 experts"),
    (6, 6, 6, "tensor_parallel_size: 6 does not divide the 8 KV heads"),
    (12, 12, 4, "12 is more than the 8 KV heads and not a multiple of them"),
    (32, 32, 32, "32 does not divide the 48 attention heads"),
])
def test_layouts_that_cannot_work_are_one_line(world, tp, ep, message):
    with pytest.raises(ConfigError, match=message):
        ShardPlan(world_size=world, rank=0, tp=tp, ep=ep).check(M27, None)


def test_every_rank_holds_a_distinct_slice_and_together_all():
    world, tp, ep = 8, 4, 2
    plans = [ShardPlan(world, r, tp, ep) for r in range(world)]
    vocab = sorted((p.local_vocab(211).start, p.local_vocab(211).stop) for p in plans)
    assert vocab[0][0] == 0 and vocab[-1][1] == 211 and all(a[1] == b[0] for a, b in zip(vocab, vocab[1:]))
    pieces = {(p.local_experts(256).start, p.local_intermediate(1536).start) for p in plans}
    assert len(pieces) == world  # each (expert group, intermediate slice) once
    heads = {p.local_heads(48).start for p in plans}
    assert heads == {0, 12, 24, 36}  # each TP group of 4 splits the heads; the 2 groups hold the same


@pytest.mark.parametrize("text,memory,count", [
    ("h100-80g:4", 81559 * 2**20, 4), ("910c-64g-die:16", 64 * 2**30, 16), ("96g:4", 96 * 10**9, 4),
    ("96gi:2", 96 * 2**30, 2), ("141.5g:1", int(141.5e9), 1)])
def test_devices(text, memory, count):
    d = parse_devices(text)
    assert (d.memory, d.count) == (memory, count)


@pytest.mark.parametrize("text", ["h100:4", "h100-80g", "96g:0", "96tb:2", "x:y"])
def test_bad_devices_are_one_line(text):
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(text)
