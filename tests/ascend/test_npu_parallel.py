"""TP2 and EP2 over HCCL on two NPUs (`torchrun --nproc-per-node 2 -m moerun logits`) in bfloat16 (the NPU kernels'
dtype), against transformers and the one-NPU run. Skipped, with the reason, where fewer than two NPUs are visible
(the same runs are tested on the CPU over gloo, emulated, by tests/test_parallel_launch.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_yaml
from hf_checkpoints import hf_logits
from launching import torchrun
from npu_host import NPU, npu_skip_reason

from moerun.runtime.engine import Engine
from moerun.runtime.parity import compare_logits


def two_npu_skip_reason() -> str | None:
    reason = npu_skip_reason()
    if reason is None:
        import torch_npu

        if torch_npu.npu.device_count() < 2:
            reason = f"needs two NPUs, {torch_npu.npu.device_count()} visible (ASCEND_RT_VISIBLE_DEVICES)"
    return reason


pytestmark = pytest.mark.skipif(two_npu_skip_reason() is not None, reason=str(two_npu_skip_reason()))

TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"expert_parallel_size": 2}], ids=["tp2", "ep2"])
def test_two_npus_match_transformers_and_one_npu(layout, hf_checkpoint, write_yaml, tmp_path):
    folder, model = hf_checkpoint("m2_like", torch.bfloat16, 3)
    npu = {"emulate": False, "device": NPU}
    one = Engine.from_config(write_yaml(run_yaml(folder, backend="ascend", dtype="bfloat16", block_size=128,
                                                 ascend=npu), "one.yaml")).logits(TOKENS)
    config = write_yaml(run_yaml(folder, backend="ascend", dtype="bfloat16", block_size=128, ascend=npu,
                                 parallel=layout), "two.yaml")
    out = tmp_path / "logits.npy"
    proc = torchrun(2, ["-m", "moerun", "logits", "-c", str(config), "--token-ids", ",".join(map(str, TOKENS)),
                        "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.from_numpy(np.load(out))
    to_hf = compare_logits(hf_logits(model.to(torch.bfloat16), TOKENS), ours)
    assert to_hf.mean_kl < 2e-3 and to_hf.top1_agreement >= 0.9, to_hf
    # the all-reduces round partial sums to bf16 once more than one NPU does: agreement, not identity
    to_one = compare_logits(one, ours)
    assert to_one.mean_kl < 1e-3 and to_one.top1_agreement >= 0.95, to_one
