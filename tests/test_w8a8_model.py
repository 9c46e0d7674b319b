"""W8A8 end to end through the real loader: transformers-saved checkpoints through `moerun quantize --w8a8`, loaded
from a plain YAML by `moerun logits` / `generate` / the engine, on the emulated Ascend backend against the CPU W8A8
reference and both against the float model they came from; the loaded weights against the files read with
safetensors; what a backend that cannot run W8A8 gets. Over several ranks: tests/test_w8a8_sharded.py (each rank's
slices) and tests/test_parallel_launch.py (TP / EP runs over gloo)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import run_yaml
from hf_checkpoints import hf_logits
from w8a8_checkpoints import quantize, stored

from moerun.backends.base import W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.backend import CpuBackend
from moerun.backends.cuda.backend import CudaBackend
from moerun.backends.errors import UnsupportedModelError
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.cli import main
from moerun.runtime.engine import Engine
from moerun.runtime.loader import WeightLoader
from moerun.runtime.model_config import load_model_config
from moerun.runtime.parity import compare_logits
from moerun.runtime.sampling_params import SamplingParams
from moerun.runtime.weights import tensors

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]


def w8a8_yaml(folder, backend="cpu", dtype="float32") -> dict:
    if backend == "ascend":
        return run_yaml(folder, backend="ascend", dtype=dtype, block_size=128, ascend={"emulate": True})
    return run_yaml(folder, dtype=dtype)


@pytest.fixture
def engine(write_yaml):
    """engine(folder, backend="cpu", dtype="float32") -> Engine over a W8A8 folder, from a plain YAML."""
    return lambda folder, backend="cpu", dtype="float32": Engine.from_config(
        write_yaml(w8a8_yaml(folder, backend, dtype), f"{backend}_{dtype}.yaml"))


@pytest.fixture(scope="module")
def w8a8_demo(demo_folder, tmp_path_factory):
    """The demo checkpoint (tokenizer, I = 64: no padding for the Ascend int8 kernels) in W8A8."""
    return quantize(demo_folder, tmp_path_factory.mktemp("demo_w8a8") / "w8a8")


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope"], ids=["head_dim_128", "head_dim_16_padded"])
def test_float32_ascend_matches_the_cpu_w8a8_reference(shape, w8a8_checkpoint, write_yaml, tmp_path):
    """`moerun logits` on each backend's YAML: the issue's bar, 1e-4 of the logit scale with the same argmax."""
    folder, _ = w8a8_checkpoint(shape, torch.float32)
    out = {}
    for backend in ("cpu", "ascend"):
        config = write_yaml(w8a8_yaml(folder, backend), f"{backend}.yaml")
        out[backend] = tmp_path / f"{backend}.npy"
        assert main(["logits", "-c", str(config), "--token-ids", ",".join(map(str, TOKENS)), "--out",
                     str(out[backend])]) == 0
    cpu, ascend = (torch.from_numpy(np.load(out[b])) for b in ("cpu", "ascend"))
    assert cpu.shape == (len(TOKENS), 211)
    assert (ascend - cpu).abs().max() <= 1e-4 * cpu.abs().max()
    assert torch.equal(ascend.argmax(-1), cpu.argmax(-1))


def test_bfloat16_ascend_stays_in_the_16_bit_band(w8a8_checkpoint, engine):
    """Rounding order differs (bf16 combine weights, fused norms), and int8 requantization amplifies it a little:
    the bar is the band the float path meets against transformers, widened to 3e-3 mean KL."""
    folder, _ = w8a8_checkpoint("m2_like", torch.bfloat16, seed=3)
    report = compare_logits(engine(folder, dtype="bfloat16").logits(TOKENS),
                            engine(folder, "ascend", "bfloat16").logits(TOKENS))
    assert report.mean_kl < 3e-3 and report.top1_agreement >= 0.9, report


def test_greedy_generation_matches_between_backends(w8a8_checkpoint, engine):
    """Per-token quantization makes a token's result independent of its batchmates: decode steps agree too."""
    folder, _ = w8a8_checkpoint("m2_like", torch.float32)
    prompts, params = [TOKENS[:7], TOKENS[3:5], TOKENS], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ascend, cpu = engine(folder, "ascend").generate(prompts, params), engine(folder).generate(prompts, params)
    assert [o.output_token_ids for o in ascend] == [o.output_token_ids for o in cpu]


def test_moerun_generate_on_a_w8a8_folder(w8a8_demo, write_yaml, capsys):
    """The command a user runs, on a folder with a tokenizer: the same greedy text from both backends."""
    texts = []
    for backend in ("cpu", "ascend"):
        config = write_yaml(w8a8_yaml(w8a8_demo, backend), f"{backend}.yaml")
        assert main(["generate", "-c", str(config), "-p", "The cat", "--temperature", "0", "--max-tokens", "6"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_w8a8_stays_close_to_the_float_model(w8a8_checkpoint, engine, hf_checkpoint):
    """int8 weights and activations on a toy model (hidden 64: few channels to average quantization noise over):
    the distribution moves by a mean KL of ~2e-3, the top token never."""
    folder, _ = w8a8_checkpoint("m2_like", torch.float32)
    _, model = hf_checkpoint("m2_like", torch.float32, 0)
    report = compare_logits(hf_logits(model.float(), TOKENS), engine(folder).logits(TOKENS))
    assert report.mean_kl < 5e-3 and report.top1_agreement >= 0.95, report


def test_loaded_weights_are_the_stored_int8_and_scales(w8a8_checkpoint, engine):
    """Every W8A8 module as the CPU backend holds it, against the files read with safetensors: int8 weights as
    stored, scale [out, 1] as [out]; experts stacked gate (w1) rows, then up (w3), and down (w2); FLOAT tensors in
    the model dtype, the router in fp32."""
    folder, _ = w8a8_checkpoint("gqa4_half_rope", torch.bfloat16)
    files, weights = stored(folder), engine(folder, dtype="bfloat16").model.weights

    def same(loaded: W8A8LinearWeight, module: str, rows: slice = slice(None)) -> bool:
        return (torch.equal(loaded.weight[rows], files[f"{module}.weight"])
                and torch.equal(loaded.scale[rows], files[f"{module}.weight_scale"][:, 0]))

    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert same(getattr(layer, proj), f"{p}.self_attn.{proj}"), proj
        experts = layer.experts
        assert isinstance(experts, W8A8ExpertWeights) and experts.w13.dtype == torch.int8
        inter = experts.w2.shape[-1]
        for e in range(experts.w13.shape[0]):
            m = f"{p}.block_sparse_moe.experts.{e}"
            assert same(W8A8LinearWeight(experts.w13[e], experts.w13_scale[e]), f"{m}.w1", slice(0, inter))
            assert same(W8A8LinearWeight(experts.w13[e], experts.w13_scale[e]), f"{m}.w3", slice(inter, None))
            assert same(W8A8LinearWeight(experts.w2[e], experts.w2_scale[e]), f"{m}.w2")
        assert layer.router.dtype == torch.float32
        assert torch.equal(layer.router, files[f"{p}.block_sparse_moe.gate.weight"])
        assert layer.input_norm.dtype == torch.bfloat16
    assert weights.embed.dtype == weights.lm_head.dtype == torch.bfloat16
    assert torch.equal(weights.lm_head, files["lm_head.weight"])


def test_ascend_w8a8_experts_are_laid_out_from_the_files(w8a8_demo, engine):
    """The demo's I = 64 needs no padding: the int8 stacks are [E, H, 2I] (gate columns first) and [E, I, H],
    against the files."""
    files, layer = stored(w8a8_demo), engine(w8a8_demo, "ascend").model.weights.layers[1]
    p = "model.layers.1.block_sparse_moe.experts"
    for e in (0, 7, 15):
        w13 = torch.cat([files[f"{p}.{e}.w1.weight"], files[f"{p}.{e}.w3.weight"]]).T
        assert torch.equal(layer.experts.w13[e], w13) and torch.equal(layer.experts.w2[e], files[f"{p}.{e}.w2.weight"].T)
        scales = torch.cat([files[f"{p}.{e}.w1.weight_scale"], files[f"{p}.{e}.w3.weight_scale"]])[:, 0]
        assert torch.equal(layer.experts.w13_scale[e], scales)


def test_weight_bytes_and_progress_count_int8_and_scales(w8a8_checkpoint):
    """The pre-load memory check's figure is what the loaded model holds (distinct storages counted), and the
    progress ends at every stored byte."""
    folder, _ = w8a8_checkpoint("gqa4_half_rope", torch.bfloat16)
    cfg = load_model_config(folder)
    loader = WeightLoader(Checkpoint(folder), cfg, CpuBackend({}, torch.bfloat16))
    calls = []
    weights = loader.load(cfg.num_layers, lambda done, total: calls.append((done, total)))
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(weights)}
    assert loader.weight_bytes(cfg.num_layers) == sum(held.values())
    on_disk = sum(t.nbytes for t in stored(folder).values())
    assert calls[-1] == (on_disk, on_disk)


def test_a_backend_without_w8a8_is_refused_in_one_line(w8a8_checkpoint):
    """Dequantized, a W8A8 checkpoint would need twice the memory it was made for: refused, naming the backend and
    what runs it. CUDA declares no W8A8 (its class is read without building it: no GPU here)."""

    class FloatOnly(CpuBackend):
        name = "floatonly"
        capabilities = dataclasses.replace(CpuBackend.capabilities, w8a8=False)

    folder, _ = w8a8_checkpoint("gqa4_half_rope", torch.float32)
    with pytest.raises(UnsupportedModelError, match="backend floatonly: does not run W8A8 checkpoints .*backend ascend") as e:
        WeightLoader(Checkpoint(folder), load_model_config(folder), FloatOnly({}, torch.float32))
    assert "\n" not in str(e.value)
    assert not CudaBackend.capabilities.w8a8
