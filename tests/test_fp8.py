"""FP8 block checkpoints: dequantized at load, they must give the logits of their dequantized weights."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml
from fp8_checkpoints import make_fp8_pair
from safetensors import safe_open

from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.runtime.engine import Engine
from moerun.backends.errors import CheckpointError

TOKENS = [3, 9, 27, 81, 33, 99, 5, 1, 0, 210, 17]


@pytest.mark.parametrize("block", [(16, 16), (24, 40)], ids=["aligned", "ragged_tail"])
def test_fp8_checkpoint_matches_dequantized_reference(block, hf_checkpoint, write_yaml, tmp_path):
    from transformers import MiniMaxM2ForCausalLM
    from hf_checkpoints import hf_logits

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", block)
    ours = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8"))).logits(TOKENS)
    # transformers on the dequantized float weights is the reference.
    ref_model = MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    ref = hf_logits(ref_model, TOKENS)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_dequantize_matches_tilewise_numpy(tmp_path):
    from fp8_checkpoints import dequantize_numpy, quantize_block

    w = torch.randn(70, 50)
    q, s = quantize_block(w, (32, 16))
    assert torch.equal(dequantize_fp8_block(q, s, (32, 16), torch.float32), dequantize_numpy(q, s, (32, 16)))
    # and a stacked [E, out, in] input dequantizes expert by expert
    stacked = dequantize_fp8_block(torch.stack([q, q]), torch.stack([s, 2 * s]), (32, 16), torch.float32)
    assert torch.equal(stacked[1], 2 * dequantize_numpy(q, s, (32, 16)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_every_e4m3_value_into_a_strided_destination(dtype):
    """Every byte value (subnormals, +-448, both NaNs) among random ones in a ragged [300, 200] weight, written through a transposed
    view as a backend layout would have it: equal to torch's own float8 cast times the tile's scale (numpy),
    rounded once to dtype."""
    from fp8_checkpoints import dequantize_numpy

    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (300, 200), dtype=torch.uint8, generator=gen)
    raw.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    q, block = raw.view(torch.float8_e4m3fn), (128, 64)
    s = torch.rand(3, 4, generator=gen) * 1e-2
    out = torch.empty(200, 300, dtype=dtype).T
    dequantize_fp8_block(q, s, block, dtype, out=out)
    ref = dequantize_numpy(q, s, block).to(dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_fp8_checkpoint_missing_scale_names_tensor(hf_checkpoint, write_yaml, tmp_path):
    from safetensors.torch import save_file

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    path = tmp_path / "fp8" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.self_attn.o_proj.weight_scale_inv"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight_scale_inv: missing"):
        Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8")))


def test_fp8_stacks_handed_to_an_fp8_backend_keep_every_block_scale(hf_checkpoint, write_yaml, tmp_path, monkeypatch):
    """A backend that executes FP8 receives float8 expert stacks with stacked block scales. This one dequantizes
    them itself at use; if any expert's or gate/up half's scales landed in the wrong slot, logits would move."""
    import dataclasses

    import moerun.runtime.launch as launch
    from hf_checkpoints import hf_logits
    from moerun.backends.cpu.backend import CpuBackend
    from transformers import MiniMaxM2ForCausalLM

    class Fp8Backend(CpuBackend):
        capabilities = dataclasses.replace(CpuBackend.capabilities, fp8_weights=True)

        def prepare_linear(self, w):
            return w

        def linear(self, x, w):
            if w.scale_inv is None:
                return super().linear(x, w.weight)
            return super().linear(x, dequantize_fp8_block(w.weight, w.scale_inv, w.block, x.dtype))

        def experts(self, x, weights, ids, e):
            assert e.w13.dtype == torch.float8_e4m3fn and e.w13_scale_inv is not None
            w13 = dequantize_fp8_block(e.w13, e.w13_scale_inv, e.block, x.dtype)
            w2 = dequantize_fp8_block(e.w2, e.w2_scale_inv, e.block, x.dtype)
            return super().experts(x, weights, ids, dataclasses.replace(e, w13=w13, w2=w2))

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    monkeypatch.setattr(launch, "get_backend_class", lambda name: Fp8Backend)
    ours = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8"))).logits(TOKENS)
    ref = hf_logits(MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32), TOKENS)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
