"""The W8A8 path on a real Ascend NPU: the shared op cases of tests/w8a8_cases.py against the CPU W8A8 reference
(as tests/test_ascend_backend_ops.py runs them under emulation), the four int8 ops against their emulation, and a
quantized transformers-saved checkpoint end to end against the CPU backend. bfloat16 (the A2/A3 kernels take no
float32). Skipped, with the reason, without an NPU."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml
from npu_host import NPU, requires_npu
from test_npu_ops_vs_emulation import both
from w8a8_cases import EXPERT_CASES, LINEAR_CASES, expert_case, linear_case

from moerun.backends.ascend.backend import AscendBackend
from moerun.backends.cpu import w8a8 as ref
from moerun.runtime.engine import Engine
from moerun.runtime.parity import compare_logits

pytestmark = requires_npu
BF16 = torch.bfloat16
TOKENS = [1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12]


@pytest.fixture(scope="module")
def backend():
    return AscendBackend({"emulate": False, "device": NPU}, BF16)


def near(actual, expected, tol=2e-2):
    return (actual.float().cpu() - expected.float()).abs().max() <= tol * expected.float().abs().max()


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_w8a8_linear_on_npu_matches_reference(backend, case):
    x, w = linear_case(case, BF16)
    assert near(backend.linear(x.to(NPU), backend.prepare_linear(w)), ref.linear(x, w))


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_w8a8_experts_on_npu_match_reference(backend, case):
    x, weights, ids, w = expert_case(case, BF16)
    out = backend.experts(x.to(NPU), weights.to(NPU), ids.to(NPU), backend.prepare_experts(w))
    assert near(out, ref.experts(x, weights, ids, w))


def test_int8_ops_agree_with_their_emulation():
    x, w = linear_case("prefill", BF16)
    (q_real, s_real), (q_emu, s_emu) = both("npu_dynamic_quant", x)
    assert (q_real.int() - q_emu.int()).abs().max() <= 1 and torch.allclose(s_real, s_emu, rtol=1e-6)
    real, emu = both("npu_quant_matmul", q_emu, w.weight.T.contiguous(), w.scale, pertoken_scale=s_emu,
                     output_dtype=BF16)
    assert near(real, emu, 1e-2)
    counts = torch.tensor([7, 0, 12], dtype=torch.int64)
    stacked = torch.randint(-128, 128, (3, 128, 128), dtype=torch.int8)
    real, emu = both("npu_grouped_matmul", [q_emu], [stacked], group_list=counts, split_item=3, group_type=0,
                     group_list_type=1, output_dtype=torch.int32)
    assert torch.equal(real[0], emu[0])  # integer sums: exact
    scale = torch.rand(3, 128) * 1e-3
    (y_real, ys_real), (y_emu, ys_emu) = both("npu_dequant_swiglu_quant", emu[0], weight_scale=scale,
                                              activation_scale=s_emu[:, None], group_index=counts, activate_left=True,
                                              quant_mode=1)
    assert (y_real.int() - y_emu.int()).abs().max() <= 1 and torch.allclose(ys_real, ys_emu, rtol=1e-5)


def test_quantized_checkpoint_on_npu_matches_the_cpu_w8a8_reference(w8a8_checkpoint, write_yaml):
    folder, _ = w8a8_checkpoint("m2_like", BF16, seed=3)
    cpu = Engine.from_config(write_yaml(run_yaml(folder, dtype="bfloat16"), "cpu.yaml")).logits(TOKENS)
    npu = Engine.from_config(write_yaml(run_yaml(folder, backend="ascend", dtype="bfloat16", block_size=128,
                                                 ascend={"emulate": False, "device": NPU}), "npu.yaml")).logits(TOKENS)
    report = compare_logits(cpu, npu)
    assert report.mean_kl < 3e-3 and report.top1_agreement >= 0.9, report
