"""The CPU backend in float64 (the high-precision run of `moerun parity`) against transformers in float64, and
`cpu.weights: checkpoint` (weights held as stored, widened per op) against weights converted at load."""

from __future__ import annotations

import copy

import torch
from conftest import run_yaml

from moerun.runtime.engine import Engine

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 200, 64, 11, 0, 123, 45, 46]


def _transformers_float64_logits(model, token_ids):
    model = copy.deepcopy(model).double()  # router included: transformers runs every op in the parameters' dtype
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"  # torch._grouped_mm takes no float64
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0]


def test_float64_run_is_float64_throughout_and_closer_to_transformers_float64(hf_checkpoint, write_yaml):
    """Every stage of the graph stays float64 (router and statistics included, nothing rounded through fp32 on the
    way). transformers in float64 still takes RMSNorm statistics and the attention softmax in fp32, which bounds the
    agreement (measured 3.4e-7 of the logit scale, float32 runs 1.2e-6); the float64 run must be the closer one."""
    folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder, dtype="float64")))
    dtypes = set()
    ours = engine.logits(TOKENS, observe=lambda name, t: dtypes.add(t.dtype)).double()
    assert dtypes == {torch.float64}
    ref = _transformers_float64_logits(model, TOKENS)
    float32 = Engine.from_config(write_yaml(run_yaml(folder, dtype="float32"), "f32.yaml")).logits(TOKENS).double()
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert (ours - ref).abs().max() < 0.5 * (float32 - ref).abs().max()


def test_weights_as_stored_compute_what_converted_weights_compute(hf_checkpoint, write_yaml):
    """A bf16 checkpoint in a float32 run: bf16 -> fp32 is exact, so holding the weights in bf16 and widening them per
    op gives the logits of converting them at load, at half the memory."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.bfloat16)
    converted = Engine.from_config(write_yaml(run_yaml(folder, dtype="float32"), "a.yaml"))
    stored = Engine.from_config(write_yaml(run_yaml(folder, dtype="float32", cpu={"weights": "checkpoint"}), "b.yaml"))
    layer = stored.model.weights.layers[0]
    assert layer.q_proj.dtype == layer.experts.w13.dtype == stored.model.weights.lm_head.dtype == torch.bfloat16
    assert layer.router.dtype == torch.float32 and converted.model.weights.layers[0].q_proj.dtype == torch.float32
    a, b = converted.logits(TOKENS), stored.logits(TOKENS)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
