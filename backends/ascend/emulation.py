"""A stand-in for the `torch_npu` module on machines without an NPU: the torch_npu functions AscendBackend calls,
with the same names, signatures, defaults, layouts, index conventions and output tuples, in plain PyTorch.

Each op checks its documented limits and raises ConstraintError where the NPU would fail or silently return
garbage, and NotEmulatedError for documented features moerun does not use. One deliberate deviation, float32
activations for fused attention and the W8A8 ops, is described in emulated_attention and emulated_quant.
Module-level names mirror torch_npu, so the backend cannot tell the two apart (see npu_ops.load).
"""

from __future__ import annotations

from types import SimpleNamespace

from moerun.backends.ascend.emulated_attention import npu_fused_infer_attention_score, npu_scatter_pa_kv_cache
from moerun.backends.ascend.emulated_checks import ConstraintError, NotEmulatedError
from moerun.backends.ascend.emulated_elementwise import npu_add_rms_norm, npu_rms_norm, npu_rotary_mul, npu_swiglu
from moerun.backends.ascend.emulated_matmul import npu_grouped_matmul
from moerun.backends.ascend.emulated_quant import npu_dequant_swiglu_quant, npu_dynamic_quant, npu_quant_matmul
from moerun.backends.ascend.emulated_routing import (
    npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_moe_token_unpermute)

__version__ = "emulated"

# torch_npu.npu is the device namespace (set_device, synchronize, ...); on the CPU there is nothing to wait for.
npu = SimpleNamespace(synchronize=lambda device=None: None)

__all__ = [
    "ConstraintError", "NotEmulatedError", "npu",
    "npu_fused_infer_attention_score", "npu_scatter_pa_kv_cache",
    "npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_rotary_mul",
    "npu_moe_gating_top_k", "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_token_unpermute",
    "npu_dynamic_quant", "npu_quant_matmul", "npu_dequant_swiglu_quant",
]
