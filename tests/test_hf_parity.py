"""The CPU reference backend against transformers' MiniMaxM2ForCausalLM on checkpoints transformers saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_yaml
from hf_checkpoints import hf_logits

from moerun.runtime.cli import main
from moerun.runtime.engine import Engine

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]


@pytest.mark.parametrize("shape", ["gqa4_half_rope", "mha_full_rope", "gqa6_quarter_rope"])
def test_float32_logits_match_transformers(shape, hf_checkpoint, write_yaml):
    folder, model = hf_checkpoint(shape, torch.float32)
    ours = Engine.from_config(write_yaml(run_yaml(folder))).logits(TOKENS)
    ref = hf_logits(model.float(), TOKENS)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("shape", ["gqa4_half_rope", "gqa6_quarter_rope"])
def test_bfloat16_logits_match_transformers(shape, hf_checkpoint, write_yaml):
    """bf16 rounds every matmul output, so the two implementations differ by rounding order only: the
    next-token distributions must agree to within the faithful-16-bit band (mean KL << 1e-3)."""
    folder, model = hf_checkpoint(shape, torch.bfloat16, seed=3)
    ours = Engine.from_config(write_yaml(run_yaml(folder, dtype="bfloat16"))).logits(TOKENS)
    ref = hf_logits(model.to(torch.bfloat16), TOKENS)
    logp_ref, logp_ours = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)
    assert kl.mean() < 2e-3, kl
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (ours - ref).abs().max() <= 0.1 * ref.abs().max()


def test_sharded_checkpoint_with_index(hf_checkpoint, write_yaml):
    folder, model = hf_checkpoint("gqa4_half_rope", torch.float32, seed=5, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    ours = Engine.from_config(write_yaml(run_yaml(folder))).logits(TOKENS[:9])
    ref = hf_logits(model.float(), TOKENS[:9])
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_logits_command_writes_transformers_logits(hf_checkpoint, write_yaml, tmp_path):
    folder, model = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    out = tmp_path / "logits.npy"
    ids = TOKENS[:12]
    code = main(["logits", "-c", str(write_yaml(run_yaml(folder))), "--token-ids", ",".join(map(str, ids)), "--out", str(out)])
    assert code == 0
    values = np.load(out)
    ref = hf_logits(model.float(), ids).numpy()
    assert values.dtype == np.float32 and values.shape == (len(ids), 211)
    assert np.abs(values - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (values.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_transformers_generate(hf_checkpoint, write_yaml):
    """Decode over the paged cache against transformers' own KV-cached greedy generation."""
    from moerun.runtime.sampling_params import SamplingParams

    folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder, block_size=16)))
    prompt = TOKENS[:7]
    ours = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].output_token_ids
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = model.float().generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, min_new_tokens=20)[0, len(prompt):].tolist()
    assert ours == ref


def test_tied_word_embeddings(tmp_path, write_yaml):
    """tie_word_embeddings: transformers saves no lm_head; the logits use the embedding matrix."""
    import hf_checkpoints

    model = hf_checkpoints.build_hf_model(dict(hf_checkpoints.SHAPES["gqa4_half_rope"], tie_word_embeddings=True), seed=4)
    hf_checkpoints.save_hf_checkpoint(model, tmp_path / "tied")
    ours = Engine.from_config(write_yaml(run_yaml(tmp_path / "tied"))).logits(TOKENS[:8])
    ref = hf_logits(model.float(), TOKENS[:8])
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_release_style_config_json_keeps_partial_rope(hf_checkpoint, write_yaml, tmp_path):
    """The M2 release's config.json has only the legacy rotary_dim (no rope_parameters) and remote-code fields.
    Dropping rotary_dim would silently turn partial RoPE into full RoPE (transformers#48241): logits must stay."""
    import json
    import shutil

    folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(rope_theta=theta, rotary_dim=8, torch_dtype="float32", transformers_version="4.46.1",
               attn_type_list=[1, 1], use_qk_norm=True, qk_norm_type="per_layer", scoring_func="sigmoid",
               use_routing_bias=True, shared_intermediate_size=0, use_mtp=True, num_mtp_modules=3,
               auto_map={"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config"})
    cfg.pop("dtype", None)
    (legacy / "config.json").write_text(json.dumps(cfg))
    engine = Engine.from_config(write_yaml(run_yaml(legacy)))
    assert engine.config.rotary_dim == 8
    ours = engine.logits(TOKENS)
    ref = hf_logits(model.float(), TOKENS)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
