"""The whole model through the Ascend code path (emulate: true) on checkpoints transformers saved: against
transformers itself and against the CPU reference backend, prefill, decode and mixed batches, float32 and bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_yaml
from engine_runs import against_full_prefill, greedy_with_logprobs
from hf_checkpoints import hf_logits

from moerun.runtime.cli import main
from moerun.runtime.engine import Engine
from moerun.runtime.parity import compare_logits
from moerun.runtime.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]
# "m2_like" has MiniMax-M2's attention geometry (head_dim 128: FIA's native TND size, no padding); the other
# shared shapes (head_dim 16, 12, 32) exercise the zero-padded path.
@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    """checkpoint(shape, dtype, seed) -> (folder, transformers model), shapes from hf_checkpoints.SHAPES."""
    return hf_checkpoint


def ascend_yaml(folder, dtype="float32", **sections):
    return run_yaml(folder, backend="ascend", dtype=dtype, block_size=128, ascend={"emulate": True}, **sections)


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope", "mha_full_rope", "gqa6_quarter_rope"])
def test_float32_ascend_logits_match_transformers(shape, checkpoint, write_yaml):
    folder, model = checkpoint(shape, torch.float32)
    ours = Engine.from_config(write_yaml(ascend_yaml(folder))).logits(TOKENS)
    ref = hf_logits(model.float(), TOKENS)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("shape", ["m2_like", "gqa4_half_rope", "gqa6_quarter_rope"])
def test_bfloat16_ascend_logits_match_transformers(shape, checkpoint, write_yaml):
    """Rounding order differs from transformers' (fused fp32 norms and activations), so the bar is the faithful
    16-bit band the CPU backend meets against transformers, not equality."""
    folder, model = checkpoint(shape, torch.bfloat16, seed=3)
    ours = Engine.from_config(write_yaml(ascend_yaml(folder, "bfloat16"))).logits(TOKENS)
    ref = hf_logits(model.to(torch.bfloat16), TOKENS)
    report = compare_logits(ref, ours)
    assert report.mean_kl < 2e-3 and report.top1_agreement >= 0.9 and report.max_abs_rel <= 0.1, report


@pytest.mark.parametrize("shape,dtype", [("gqa6_quarter_rope", "float32"), ("m2_like", "float32"),
                                         ("gqa4_half_rope", "bfloat16"), ("m2_like", "bfloat16")])
def test_parity_command_cpu_vs_ascend(shape, dtype, checkpoint, write_yaml, capsys):
    folder, _ = checkpoint(shape, getattr(torch, dtype), seed=3 if dtype == "bfloat16" else 0)
    cpu = write_yaml(run_yaml(folder, dtype=dtype), "cpu.yaml")
    ascend = write_yaml(ascend_yaml(folder, dtype), "ascend.yaml")
    extra = ["--max-abs-rel", "1e-4"] if dtype == "float32" else []  # fp32: the same numbers, not just close
    code = main(["parity", "-c", str(cpu), "-c", str(ascend), "--token-ids", ",".join(map(str, TOKENS)), *extra])
    assert code == 0, capsys.readouterr().out


def test_demo_configs_agree(capsys):
    """The shipped emulated config against the shipped CPU demo: float32, so the same numbers."""
    configs = REPO / "configs"
    code = main(["parity", "-c", str(configs / "demo.yaml"), "-c", str(configs / "ascend_demo_emulated.yaml"),
                 "--token-ids", "1,2,3,4,5,6,7,8,9,10", "--max-abs-rel", "1e-4"])
    assert code == 0, capsys.readouterr().out


def test_decode_and_chunked_prefill_match_full_prefill(checkpoint, write_yaml):
    """Ragged requests prefilled in chunks of at most 50 tokens a step (mixed batches), then decoded together;
    prompts cross the 128-token block edge. Every step's logprobs must equal a single full prefill's."""
    folder, _ = checkpoint("m2_like", torch.float32)
    engine = Engine.from_config(write_yaml(ascend_yaml(folder, scheduler={"max_num_batched_tokens": 50})))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (3, 140, 1, 127)]
    outputs, entries = greedy_with_logprobs(engine, prompts, steps=6)
    for prompt, output, seq_entries in zip(prompts, outputs, entries):
        got, want, argmax, scale = against_full_prefill(engine, prompt, output, seq_entries)
        assert (got - want).abs().max() <= 1e-4 * scale and output == argmax.tolist()


def test_greedy_generation_matches_cpu(checkpoint, write_yaml):
    folder, _ = checkpoint("gqa4_half_rope", torch.float32)
    prompts = [TOKENS[:7], TOKENS[3:5], TOKENS]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cpu = Engine.from_config(write_yaml(run_yaml(folder), "cpu.yaml")).generate(prompts, params)
    ascend = Engine.from_config(write_yaml(ascend_yaml(folder), "ascend.yaml")).generate(prompts, params)
    assert [o.output_token_ids for o in ascend] == [o.output_token_ids for o in cpu]
