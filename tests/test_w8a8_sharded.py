"""Each rank's slices of a W8A8 (msModelSlim) checkpoint, loaded in one process (no torchrun): every rank of a
world of four loads its ShardPlan's part, which must equal the same cut of the files read with safetensors: rows of
q/k/v (and of w1/w3) with the scales of those rows, columns of o_proj (and of w2) with every row's scale, only its
experts with their global range; its bytes are what `moerun plan` counts. Offsets are checked over the rows a rank
reads, and a layout the int8 channels cannot split is refused in one line. Runs over gloo: test_parallel_launch."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_yaml
from safetensors.torch import load_file, save_file
from w8a8_checkpoints import stored

from moerun.backends.ascend.backend import AscendBackend
from moerun.backends.cpu.backend import CpuBackend
from moerun.backends.errors import CheckpointError
from moerun.runtime import capacity
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.cli import main
from moerun.runtime.loader import WeightLoader
from moerun.runtime.model_config import load_model_config
from moerun.runtime.shard_plan import ShardPlan
from moerun.runtime.weights import tensors

WORLD = 4
# gqa4_half_rope: 8 query heads and 2 KV heads of 16, 8 experts of intermediate 32, vocabulary 211.
TP2_EP2 = {"tp": 2, "ep": 2}  # heads over 2, experts over 2 groups of 2 ranks that split each intermediate
TP4_EP4 = {"tp": 4, "ep": 4}  # each KV head on 2 ranks; whole experts, 2 per rank


@pytest.fixture(scope="module")
def export(w8a8_checkpoint):
    folder, _ = w8a8_checkpoint("gqa4_half_rope", torch.float32)
    return folder, stored(folder)


def load_rank(folder, rank: int, layout: dict, backend=None, progress=None):
    cfg = load_model_config(folder)
    loader = WeightLoader(Checkpoint(folder), cfg, backend or CpuBackend({}, torch.float32),
                          ShardPlan(world_size=WORLD, rank=rank, **layout))
    return cfg, loader, loader.load(cfg.num_layers, progress)


def cut(files, module: str, rows=slice(None), cols=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight of `module` cut by hand, and the scales of the rows kept, as [rows]."""
    return files[f"{module}.weight"][rows, cols], files[f"{module}.weight_scale"][rows, 0]


@pytest.mark.parametrize("rank", range(WORLD))
def test_tp2_ep2_slices_equal_the_files_cut(rank, export):
    folder, files = export
    _, loader, weights = load_rank(folder, rank, TP2_EP2)
    q = slice(rank % 2 * 64, rank % 2 * 64 + 64)  # 4 of 8 heads of 16
    kv = slice(rank % 2 * 16, rank % 2 * 16 + 16)  # 1 of 2 KV heads
    inter = slice(rank % 2 * 16, rank % 2 * 16 + 16)  # half of each expert's 32
    experts = range(rank // 2 * 4, rank // 2 * 4 + 4)
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}.self_attn"
        for field, rows, cols in (("q_proj", q, slice(None)), ("k_proj", kv, slice(None)),
                                  ("v_proj", kv, slice(None)), ("o_proj", slice(None), q)):
            weight, scale = cut(files, f"{p}.{field}", rows, cols)
            loaded = getattr(layer, field)
            assert torch.equal(loaded.weight, weight) and torch.equal(loaded.scale, scale), (i, field)
        e = layer.experts
        assert (e.first_expert, e.layer_experts, e.w13.shape[0]) == (experts.start, 8, 4)
        for slot, expert in enumerate(experts):
            m = f"model.layers.{i}.block_sparse_moe.experts.{expert}"
            (w1, s1), (w3, s3), (w2, s2) = cut(files, f"{m}.w1", inter), cut(files, f"{m}.w3", inter), cut(
                files, f"{m}.w2", cols=inter)
            assert torch.equal(e.w13[slot], torch.cat([w1, w3])) and torch.equal(e.w13_scale[slot], torch.cat([s1, s3]))
            assert torch.equal(e.w2[slot], w2) and torch.equal(e.w2_scale[slot], s2), (i, expert)


@pytest.mark.parametrize("layout", [TP2_EP2, TP4_EP4], ids=["tp2xep2", "tp4xep4"])
def test_a_rank_holds_the_bytes_the_planner_counts(layout, export):
    """weight_bytes (the pre-load memory check) = the bytes the loaded rank holds = capacity's closed form for
    W8A8 (int8 plus 4 B per output row of each slice), on rank 0 (the vocabulary's last rank runs short); the
    progress ends at the bytes the rank read, a fraction of the files."""
    folder, files = export
    calls = []
    cfg, loader, weights = load_rank(folder, 0, layout, progress=lambda done, total: calls.append((done, total)))
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(weights)}
    planned = capacity.weight_bytes(cfg, ShardPlan(world_size=WORLD, rank=0, **layout),
                                    capacity.Format(capacity.W8A8, "float32"))
    assert loader.weight_bytes(cfg.num_layers) == sum(held.values()) == planned.total
    assert calls[-1] == (loader.bytes_read, loader.bytes_read)
    assert loader.bytes_read < 0.5 * sum(t.nbytes for t in files.values())


def test_replicated_kv_heads_and_whole_experts_on_the_emulated_ascend(export):
    """TP4 over 2 KV heads: ranks 2 and 3 both hold KV head 1 with its scales; EP4: the Ascend int8 stacks carry
    the rank's expert range (experts 6 and 7 of 8 on rank 3)."""
    folder, files = export
    ascend = AscendBackend(AscendBackend.validate_options({"emulate": True}, "ascend"), torch.float32)
    for rank in (2, 3):
        _, _, weights = load_rank(folder, rank, TP4_EP4, ascend)
        weight, scale = cut(files, "model.layers.0.self_attn.k_proj", slice(16, 32))
        k = weights.layers[0].k_proj
        assert torch.equal(k.weight, weight.T) and torch.equal(k.scale, scale)
    experts = weights.layers[1].experts
    assert (experts.first_expert, experts.layer_experts) == (6, 8)
    m = "model.layers.1.block_sparse_moe.experts.7"  # I = 32, zero-padded to 64 for the int8 kernels
    assert torch.equal(experts.w2[1, :32], files[f"{m}.w2.weight"].T) and not experts.w2[1, 32:].any()


def test_an_offset_is_checked_by_the_ranks_that_read_its_row(export, tmp_path):
    """A nonzero weight_offset in a q_proj row that only the second TP rank holds: that rank refuses, naming
    the tensor; the first never reads the row."""
    folder, _ = export
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    name = "model.layers.1.self_attn.q_proj.weight_offset"
    (shard,) = broken.glob("quant_model_weights-*.safetensors")
    content = load_file(str(shard))
    content[name][100] = 1.0  # row 100 of 128: TP rank 1's half
    save_file(content, str(shard), metadata={"format": "pt"})
    load_rank(broken, 0, TP2_EP2)
    with pytest.raises(CheckpointError, match=f"^{name}: nonzero in .*asymmetric int8 weights are not supported"):
        load_rank(broken, 1, TP2_EP2)


def test_a_layout_the_int8_channels_cannot_split_is_one_line(export, write_yaml, monkeypatch, capsys):
    """`moerun smoke` as rank 0 of 3 (torchrun's variables): 8 heads do not split over 3 (the allowed TP sizes
    named), and with TP1 each expert's 32 intermediate rows would split 3 ways (no EP size fits): exit 2, one
    line each, before any weight is read or any rank joined."""
    folder, _ = export
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never dialled: the layout is refused first
    expected = {3: "parallel.tensor_parallel_size: 3 does not divide the 8 attention heads (q_proj rows, o_proj "
                   "columns; allowed in a world of 3: 1)",
                1: "parallel: intermediate 32 / 3 ranks per expert is not a whole number (the experts' w1/w3 rows, "
                   "w2 columns; expert_parallel_size allowed in a world of 3: none)"}
    for tp, message in expected.items():
        config = write_yaml(run_yaml(folder, parallel={"tensor_parallel_size": tp, "expert_parallel_size": 1}))
        capsys.readouterr()
        assert main(["smoke", "-c", str(config), "--steps", "1"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moerun: error: ")]
        assert errors == [f"moerun: error: rank 0: {message}"]
