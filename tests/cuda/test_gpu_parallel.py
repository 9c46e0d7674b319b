"""TP2 and EP2 over NCCL on two GPUs, launched as an operator would (`torchrun --nproc-per-node 2 -m moerun logits`),
against transformers' MiniMaxM2ForCausalLM and the one-GPU run; an FP8 checkpoint executed as stored, split at block
edges. Skipped, with the reason, where fewer than two CUDA GPUs are visible (the same runs are tested on the CPU
over gloo by tests/test_parallel_launch.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_yaml
from cuda_references import gpu_skip_reason
from fp8_checkpoints import make_fp8_pair
from hf_checkpoints import hf_logits
from launching import torchrun

from moerun.runtime.engine import Engine


def two_gpu_skip_reason() -> str | None:
    reason = gpu_skip_reason()
    if reason is None and torch.cuda.device_count() < 2:
        reason = f"needs two CUDA GPUs, {torch.cuda.device_count()} visible"
    return reason


pytestmark = pytest.mark.skipif(two_gpu_skip_reason() is not None, reason=str(two_gpu_skip_reason()))

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]
LAYOUTS = {"tp2": {"tensor_parallel_size": 2}, "ep2": {"expert_parallel_size": 2}}


def two_gpu_logits(config, tmp_path) -> np.ndarray:
    out = tmp_path / "logits.npy"
    proc = torchrun(2, ["-m", "moerun", "logits", "-c", str(config), "--token-ids", ",".join(map(str, TOKENS)),
                        "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_gpus_float32_match_transformers(layout, hf_checkpoint, write_yaml, tmp_path):
    folder, model = hf_checkpoint("gqa4_half_rope", torch.float32)
    ours = two_gpu_logits(write_yaml(run_yaml(folder, backend="cuda", cuda={"cuda_graphs": False},
                                              parallel=LAYOUTS[layout])), tmp_path)
    ref = hf_logits(model.float(), TOKENS).numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_gpus_fp8_match_one_gpu(layout, hf_checkpoint, write_yaml, tmp_path):
    """m2_like (head_dim 128, intermediate 32 per expert): with 16 x 16 blocks every TP and EP split of it is on a
    block edge, so the FP8 weights and scales are executed as stored on both GPUs."""
    folder, _ = hf_checkpoint("m2_like", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    one = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8", backend="cuda", cuda={"fp8": "on"}), "one.yaml"))
    reference = one.logits(TOKENS).numpy()
    ours = two_gpu_logits(write_yaml(run_yaml(tmp_path / "fp8", backend="cuda", cuda={"fp8": "on"},
                                              parallel=LAYOUTS[layout]), "two.yaml"), tmp_path)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()
