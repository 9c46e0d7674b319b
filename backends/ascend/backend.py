"""AscendBackend: the MiniMax-M2 graph's device ops on Huawei Ascend NPUs (Atlas A2 / 910B, A3 / 910C) via torch_npu,
or on CPU with `ascend: {emulate: true}` through the emulation of exactly the torch_npu functions called here.

This module imports without torch_npu (YAML validation imports every backend class); the ops arrive through
npu_ops.load when the backend is built. What each step calls, and what is verified where: docs/ascend.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moerun.backends.ascend import attention, model_limits, moe, npu_ops, rotary, w8a8
from moerun.backends.base import (
    AttentionMetadata, Backend, Capabilities, ExpertWeights, LinearWeight, ModelSpec, W8A8ExpertWeights,
    W8A8LinearWeight, device_of_local_rank)


class AscendBackend(Backend):
    name = "ascend"
    capabilities = Capabilities(
        # float32 only under emulation: check_model refuses it on an NPU (FIA takes fp16/bf16).
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        # Paged FIA prefill takes multiples of 128 up to 512; vllm-ascend runs 128 only, and so does moerun.
        kv_block_sizes=(128,),
        fp8_weights=False,  # A2/A3 have no FP8: the loader dequantizes FP8 checkpoints to the model dtype
        w8a8=True,  # msModelSlim W8A8_DYNAMIC checkpoints run on the int8 operators (w8a8.py)
    )
    default_options = {"emulate": False, "device": "npu:0"}

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, key_path: str) -> dict[str, Any]:
        options = super().validate_options(options, key_path)
        npu_ops.parse_device(options["device"], f"{key_path}.device")  # a typo shows up on any machine
        return options

    def __init__(self, options: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__(options, dtype)
        self._source = npu_ops.load(bool(options.get("emulate", False)), options.get("device", "npu:0"))
        self._ops = self._source.ops
        self._mask: torch.Tensor | None = None

    @classmethod
    def options_for_rank(cls, options: dict[str, Any], local_rank: int, world_size: int) -> dict[str, Any]:
        return {**options, "device": device_of_local_rank(options.get("device", "npu:0"), local_rank)}

    @property
    def process_group_backend(self) -> str:
        return "gloo" if self.options.get("emulate") else "hccl"  # hccl is registered by importing torch_npu

    @property
    def device(self) -> torch.device:
        return torch.device(self._source.device)

    def check_model(self, spec: ModelSpec) -> None:
        model_limits.check_model(spec, self.capabilities.kv_block_sizes, self._source.float32_attention)

    def describe(self) -> str:
        return f"ascend on {self._source.device} ({self._source.label})"

    # ---- weights ----
    def prepare_linear(self, w: LinearWeight | W8A8LinearWeight) -> torch.Tensor | w8a8.AscendW8A8Linear:
        if isinstance(w, W8A8LinearWeight):
            return w8a8.prepare_linear(w, self.device)
        if w.scale_inv is not None:
            raise ValueError("ascend: an FP8 linear weight reached the backend; the loader must dequantize it")
        return w.weight.to(self.device)

    def empty_experts(self, num_experts, hidden_size, intermediate_size, dtype, device) -> ExpertWeights:
        # In npu_grouped_matmul's layout already, so prepare's transpose copies nothing.
        return ExpertWeights.empty_transposed(num_experts, hidden_size, intermediate_size, dtype, device)

    def prepare_experts(self, w: ExpertWeights | W8A8ExpertWeights) -> moe.AscendExperts | w8a8.AscendW8A8Experts:
        if isinstance(w, W8A8ExpertWeights):
            return w8a8.prepare_experts(w, self.dtype, self.device)
        return moe.prepare(w, self.device)

    # ---- KV cache ----
    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype) -> attention.PagedKV:
        return attention.allocate(num_blocks, block_size, num_kv_heads, head_dim, dtype, self.device)

    def write_kv(self, kv_cache: attention.PagedKV, k, v, meta: AttentionMetadata) -> None:
        attention.write_kv(self._ops, kv_cache, k, v, meta)

    # ---- ops ----
    def linear(self, x, w):
        if isinstance(w, w8a8.AscendW8A8Linear):
            return w8a8.linear(self._ops, x, w)
        return F.linear(x, w)  # a plain aten matmul, which torch_npu runs on the NPU's cube units

    def rms_norm(self, x, weight, eps):
        return self._ops.npu_rms_norm(x, weight.to(x.dtype), eps)[0]

    def add_rms_norm(self, x, residual, weight, eps):
        normed, _rstd, summed = self._ops.npu_add_rms_norm(x, residual, weight.to(x.dtype), eps)
        return normed, summed

    def rotary(self, q, k, cos, sin):
        return rotary.apply(self._ops, q, k, cos, sin)

    def attention(self, q, kv_cache: attention.PagedKV, meta: AttentionMetadata, scale):
        if self._mask is None:
            self._mask = attention.causal_mask(self.device)
        return attention.attention(self._ops, q, kv_cache, meta, scale, self._mask)

    def route(self, router_logits, bias, top_k):
        return moe.route(self._ops, router_logits, bias, top_k)

    def experts(self, x, weights, ids, experts: moe.AscendExperts | w8a8.AscendW8A8Experts):
        if isinstance(experts, w8a8.AscendW8A8Experts):
            return w8a8.experts(self._ops, x, weights, ids, experts)
        return moe.experts(self._ops, x, weights, ids, experts)

    def synchronize(self) -> None:
        self._ops.npu.synchronize()
