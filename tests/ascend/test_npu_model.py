"""The model-level checks of tests/test_ascend_model.py on a real Ascend NPU (torch_npu + CANN, an NPU visible).

Real A2/A3 kernels take fp16/bf16 only, so these run in bfloat16 against transformers, the CPU backend and the
emulation; float32 must be refused up front. Skipped, with the reason, on hosts without an NPU."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml
from engine_runs import against_full_prefill, greedy_with_logprobs
from hf_checkpoints import hf_logits
from npu_host import NPU, requires_npu

from moerun.runtime.cli import main
from moerun.runtime.engine import Engine
from moerun.backends.errors import UnsupportedModelError
from moerun.runtime.parity import compare_logits

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]

pytestmark = requires_npu


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    """checkpoint(shape, dtype=bfloat16, seed=3) -> (folder, transformers model), shapes from hf_checkpoints.SHAPES.
    bfloat16 by default: the NPU's attention kernel takes fp16/bf16 only."""
    return lambda shape, dtype=torch.bfloat16, seed=3: hf_checkpoint(shape, dtype, seed)


def npu_yaml(folder, device, dtype="bfloat16"):
    return run_yaml(folder, backend="ascend", dtype=dtype, block_size=128, ascend={"emulate": False, "device": device})


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope", "gqa6_quarter_rope"])
def test_bfloat16_npu_logits_match_transformers(shape, checkpoint, write_yaml):
    folder, model = checkpoint(shape)
    ours = Engine.from_config(write_yaml(npu_yaml(folder, NPU))).logits(TOKENS)
    ref = hf_logits(model.to(torch.bfloat16), TOKENS)
    report = compare_logits(ref, ours)
    assert report.mean_kl < 2e-3 and report.top1_agreement >= 0.9 and report.max_abs_rel <= 0.1, report


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope"])
def test_parity_command_cpu_vs_npu(shape, checkpoint, write_yaml, capsys):
    folder, _ = checkpoint(shape)
    cpu = write_yaml(run_yaml(folder, dtype="bfloat16"), "cpu.yaml")
    real = write_yaml(npu_yaml(folder, NPU), "npu.yaml")
    code = main(["parity", "-c", str(cpu), "-c", str(real), "--token-ids", ",".join(map(str, TOKENS))])
    assert code == 0, capsys.readouterr().out


def test_npu_agrees_with_its_emulation(checkpoint, write_yaml):
    """Same code path, real kernels vs emulated ones: any gap is kernel numerics (or an emulation error)."""
    folder, _ = checkpoint("m2_like")
    real = Engine.from_config(write_yaml(npu_yaml(folder, NPU), "npu.yaml")).logits(TOKENS)
    emulated = Engine.from_config(write_yaml(run_yaml(folder, backend="ascend", dtype="bfloat16", block_size=128,
                                                      ascend={"emulate": True}), "emu.yaml")).logits(TOKENS)
    report = compare_logits(emulated, real)
    assert report.mean_kl < 1e-3 and report.top1_agreement >= 0.95, report


def test_decode_matches_prefill_on_npu(checkpoint, write_yaml):
    folder, _ = checkpoint("m2_like")
    engine = Engine.from_config(write_yaml(npu_yaml(folder, NPU)))
    prompt = (TOKENS * 7)[:140]  # crosses the 128-token block edge
    (output,), (entries,) = greedy_with_logprobs(engine, [prompt], steps=9)
    got, want, argmax, _ = against_full_prefill(engine, prompt, output, entries)
    # bf16: decode and prefill round differently; the top-20 logprobs stay close and the argmax mostly agrees
    assert (got - want).abs().mean() < 0.05 and (torch.tensor(output) == argmax).float().mean() >= 0.9


def test_float32_is_refused_on_a_real_npu(checkpoint, write_yaml):
    folder, _ = checkpoint("m2_like", torch.float32, seed=0)
    with pytest.raises(UnsupportedModelError, match="float16/bfloat16 only"):
        Engine.from_config(write_yaml(npu_yaml(folder, "float32")))
