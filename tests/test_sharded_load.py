"""Each rank's slices, loaded in place: every rank of a world of four loads its ShardPlan's part of an FP8 block
checkpoint, in one process (no torchrun), and each tensor must equal the same slice cut with torch indexing from
the independently dequantized reference (fp8_checkpoints: numpy, tile by tile). Blocks of 24 x 40 make every
split land inside a block: q/k/v rows at head edges, o_proj and w2 columns, each expert's intermediate halves.
An FP8-executing backend instead receives the float8 bytes and block scales of its slices, on block edges."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fp8_checkpoints import make_fp8_pair
from safetensors.torch import load_file

from moerun.backends.base import LinearWeight
from moerun.backends.cpu.backend import CpuBackend
from moerun.runtime import capacity
from moerun.runtime.capacity import FP8, Format
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.loader import WeightLoader
from moerun.runtime.model_config import load_model_config
from moerun.runtime.shard_plan import ShardPlan

WORLD, TP, EP = 4, 2, 2  # TP2 attention, experts over 2 groups of 2 ranks that split each expert's intermediate


class Fp8Backend(CpuBackend):
    """Holds FP8 weights as stored (what the CUDA backend does on sm89+), so the loader hands it float8 slices."""

    capabilities = dataclasses.replace(CpuBackend.capabilities, fp8_weights=True)

    def prepare_linear(self, w):
        return w


def load_rank(folder, backend_cls, rank: int):
    cfg = load_model_config(folder)
    backend = backend_cls(backend_cls.validate_options({}, "cpu"), torch.float32)
    loader = WeightLoader(Checkpoint(folder), cfg, backend, ShardPlan(world_size=WORLD, rank=rank, tp=TP, ep=EP))
    return cfg, loader.load(cfg.num_layers), loader


@pytest.fixture(scope="module")
def fp8_pair(hf_checkpoint, tmp_path_factory):
    def make(block):
        folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
        root = tmp_path_factory.mktemp(f"fp8_{block[0]}x{block[1]}")
        make_fp8_pair(folder, root / "fp8", root / "ref", block)
        return root / "fp8", load_file(str(root / "ref" / "model.safetensors"))

    return make


@pytest.mark.parametrize("rank", range(WORLD))
def test_dequantized_slices_equal_the_reference_cut(rank, fp8_pair):
    folder, ref = fp8_pair((24, 40))
    cfg, weights, loader = load_rank(folder, CpuBackend, rank)
    plan = ShardPlan(world_size=WORLD, rank=rank, tp=TP, ep=EP)
    d, tp_rank = cfg.head_dim, rank % TP
    q = slice(tp_rank * 4 * d, (tp_rank + 1) * 4 * d)  # 8 heads over TP2
    kv = slice(tp_rank * d, (tp_rank + 1) * d)  # 2 KV heads over TP2
    experts = range(rank // 2 * 4, rank // 2 * 4 + 4)  # 8 experts over EP2
    inter = slice(rank % 2 * 16, rank % 2 * 16 + 16)  # intermediate 32 over the 2 ranks of an expert group
    vocab = slice(rank * 53, min(rank * 53 + 53, 211))  # 211 rows over 4 ranks
    assert torch.equal(weights.embed, ref["model.embed_tokens.weight"][vocab])
    assert torch.equal(weights.lm_head, ref["lm_head.weight"][vocab])
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}"
        for field, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            assert torch.equal(getattr(layer, field), ref[f"{p}.self_attn.{field}.weight"][rows]), (i, field)
        assert torch.equal(layer.o_proj, ref[f"{p}.self_attn.o_proj.weight"][:, q])
        assert torch.equal(layer.q_norm, ref[f"{p}.self_attn.q_norm.weight"][q])
        assert torch.equal(layer.k_norm, ref[f"{p}.self_attn.k_norm.weight"][kv])
        assert torch.equal(layer.router, ref[f"{p}.block_sparse_moe.gate.weight"])
        e = f"{p}.block_sparse_moe.experts"
        assert layer.experts.first_expert == experts.start and layer.experts.layer_experts == 8
        for slot, expert in enumerate(experts):
            gate_up = torch.cat([ref[f"{e}.{expert}.w1.weight"][inter], ref[f"{e}.{expert}.w3.weight"][inter]])
            assert torch.equal(layer.experts.w13[slot], gate_up), (i, expert)
            assert torch.equal(layer.experts.w2[slot], ref[f"{e}.{expert}.w2.weight"][:, inter]), (i, expert)
    whole = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert loader.bytes_read < 0.5 * whole  # its slices and the blocks around them (24 x 40: wide), not all
    assert loader.weight_bytes(cfg.num_layers) == sum(
        t.nbytes for t in (weights.embed, weights.lm_head, weights.norm, *[
            x for layer in weights.layers for x in (
                layer.input_norm, layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.q_norm, layer.k_norm,
                layer.post_attention_norm, layer.router, layer.router_bias, layer.experts.w13, layer.experts.w2)]))
    if vocab.stop - vocab.start == 53:  # `moerun plan`'s closed form counts a full share of the vocabulary
        assert loader.weight_bytes(cfg.num_layers) == capacity.weight_bytes(cfg, plan, Format("float32", "float32")).total


@pytest.mark.parametrize("rank", [0, 3])
def test_an_fp8_backend_gets_its_float8_slices_and_their_scales(rank, fp8_pair):
    folder, _ = fp8_pair((16, 16))
    stored = load_file(str(folder / "model.safetensors"))
    cfg, weights, loader = load_rank(folder, Fp8Backend, rank)
    plan = ShardPlan(world_size=WORLD, rank=rank, tp=TP, ep=EP)
    if rank == 0:  # float8 slices and their scale blocks, as `moerun plan` counts them
        assert loader.weight_bytes(cfg.num_layers) == capacity.weight_bytes(
            cfg, plan, Format(FP8, "float32", (16, 16))).total
    q, inter = slice(rank % 2 * 64, rank % 2 * 64 + 64), slice(rank % 2 * 16, rank % 2 * 16 + 16)
    blocks = lambda s: slice(s.start // 16, s.stop // 16)  # noqa: E731
    p = "model.layers.1.self_attn"
    q_proj, o_proj = weights.layers[1].q_proj, weights.layers[1].o_proj
    assert isinstance(q_proj, LinearWeight) and q_proj.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(q_proj.weight.view(torch.uint8), stored[f"{p}.q_proj.weight"][q].view(torch.uint8))
    assert torch.equal(q_proj.scale_inv, stored[f"{p}.q_proj.weight_scale_inv"][blocks(q)])
    assert torch.equal(o_proj.weight.view(torch.uint8), stored[f"{p}.o_proj.weight"][:, q].view(torch.uint8))
    assert torch.equal(o_proj.scale_inv, stored[f"{p}.o_proj.weight_scale_inv"][:, blocks(q)])
    experts, e = weights.layers[1].experts, f"model.layers.1.block_sparse_moe.experts.{rank // 2 * 4 + 3}"
    assert torch.equal(experts.w2[3].view(torch.uint8), stored[f"{e}.w2.weight"][:, inter].view(torch.uint8))
    assert torch.equal(experts.w2_scale_inv[3], stored[f"{e}.w2.weight_scale_inv"][:, blocks(inter)])
    assert torch.equal(experts.w13_scale_inv[3], torch.cat([stored[f"{e}.w1.weight_scale_inv"][blocks(inter)],
                                                           stored[f"{e}.w3.weight_scale_inv"][blocks(inter)]]))
