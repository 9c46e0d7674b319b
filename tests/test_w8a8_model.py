"""W8A8 end to end at the model level: a transformers-saved checkpoint through `moerun quantize --w8a8`, its weights
assembled through runtime/w8a8_weights (the calls the loader will make), then the whole graph on the emulated
Ascend backend against the CPU W8A8 reference, and both against the float model they came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_yaml
from hf_checkpoints import hf_logits
from safetensors import safe_open
from safetensors.torch import save_file
from w8a8_checkpoints import W8A8Loader

import moerun.runtime.model_runner as model_runner
from moerun.backends.cpu.backend import CpuBackend
from moerun.runtime.engine import Engine
from moerun.runtime.parity import compare_logits
from moerun.runtime.sampling_params import SamplingParams

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]


@pytest.fixture
def w8a8_engine(monkeypatch, write_yaml):
    """w8a8_engine(folder, backend="cpu", dtype="float32") -> Engine over a W8A8 folder."""
    monkeypatch.setattr(model_runner, "WeightLoader", W8A8Loader)

    def build(folder, backend="cpu", dtype="float32", **sections):
        block = 128 if backend == "ascend" else 16
        if backend == "ascend":
            sections["ascend"] = {"emulate": True}
        return Engine.from_config(write_yaml(run_yaml(folder, backend=backend, dtype=dtype, block_size=block,
                                                      **sections), f"{backend}.yaml"))

    return build


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope"], ids=["head_dim_128", "head_dim_16_padded"])
def test_float32_ascend_matches_the_cpu_w8a8_reference(shape, w8a8_checkpoint, w8a8_engine):
    folder, _ = w8a8_checkpoint(shape, torch.float32)
    cpu = w8a8_engine(folder).logits(TOKENS)
    ascend = w8a8_engine(folder, backend="ascend").logits(TOKENS)
    assert (ascend - cpu).abs().max() <= 1e-4 * cpu.abs().max()
    assert torch.equal(ascend.argmax(-1), cpu.argmax(-1))


def test_bfloat16_ascend_stays_in_the_16_bit_band(w8a8_checkpoint, w8a8_engine):
    """Rounding order differs (bf16 combine weights, fused norms), and int8 requantization amplifies it a little:
    the bar is the band the float path meets against transformers, widened to 3e-3 mean KL."""
    folder, _ = w8a8_checkpoint("m2_like", torch.bfloat16, seed=3)
    cpu = w8a8_engine(folder, dtype="bfloat16").logits(TOKENS)
    ascend = w8a8_engine(folder, backend="ascend", dtype="bfloat16").logits(TOKENS)
    report = compare_logits(cpu, ascend)
    assert report.mean_kl < 3e-3 and report.top1_agreement >= 0.9, report


def test_greedy_generation_matches_between_backends(w8a8_checkpoint, w8a8_engine):
    """Per-token quantization makes a token's result independent of its batchmates: decode steps agree too."""
    folder, _ = w8a8_checkpoint("m2_like", torch.float32)
    prompts, params = [TOKENS[:7], TOKENS[3:5], TOKENS], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ascend, cpu = w8a8_engine(folder, backend="ascend").generate(prompts, params), w8a8_engine(folder).generate(prompts,
                                                                                                              params)
    assert [o.output_token_ids for o in ascend] == [o.output_token_ids for o in cpu]


def test_w8a8_stays_close_to_the_float_model(w8a8_checkpoint, w8a8_engine, hf_checkpoint):
    """int8 weights and activations on a toy model (hidden 64: few channels to average quantization noise over):
    the distribution moves by a mean KL of ~2e-3, the top token never."""
    folder, _ = w8a8_checkpoint("m2_like", torch.float32)
    _, model = hf_checkpoint("m2_like", torch.float32, 0)
    report = compare_logits(hf_logits(model.float(), TOKENS), w8a8_engine(folder).logits(TOKENS))
    assert report.mean_kl < 5e-3 and report.top1_agreement >= 0.95, report


def test_a_backend_without_w8a8_runs_the_dequantized_weights(w8a8_checkpoint, w8a8_engine, monkeypatch, tmp_path):
    """capabilities.w8a8 False: the weights arrive dequantized (int8 x scale), so the logits are transformers' on
    those weights, written here as a float checkpoint with numpy."""
    import dataclasses

    from transformers import MiniMaxM2ForCausalLM

    class FloatOnly(CpuBackend):
        capabilities = dataclasses.replace(CpuBackend.capabilities, w8a8=False)

    folder, _ = w8a8_checkpoint("m2_like", torch.float32)
    description = json.loads((folder / "quant_model_description.json").read_text())
    tensors = {}
    for shard in sorted(folder.glob("quant_model_weights-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    dequantized = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_offset")):
            continue
        if description[name] == "W8A8_DYNAMIC":
            scale = tensors[name.removesuffix("weight") + "weight_scale"].numpy()
            t = torch.from_numpy(t.numpy().astype(np.float32) * scale)
        dequantized[name] = t
    (tmp_path / "float").mkdir()
    save_file(dequantized, str(tmp_path / "float" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "float" / "config.json").write_text((folder / "config.json").read_text())
    ref = hf_logits(MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32), TOKENS)

    monkeypatch.setattr(model_runner, "get_backend_class", lambda name: FloatOnly)
    ours = w8a8_engine(folder).logits(TOKENS)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
