"""The CPU backend: the reference ops of ops.py behind the Backend interface."""

from __future__ import annotations

import os
from typing import Any

import torch

from moerun.backends.base import (
    AttentionMetadata, Backend, Capabilities, LinearWeight, W8A8ExpertWeights, W8A8LinearWeight)
from moerun.backends.cpu import ops, w8a8
from moerun.backends.errors import ConfigError, shown

# cpu.weights: what the loader keeps of a float weight the checkpoint stores narrower than model.dtype.
WEIGHTS_CHOICES = ("model", "checkpoint")


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        kv_block_sizes=(16, 32, 64, 128, 256),
        fp8_weights=False,
        w8a8=True,  # the reference W8A8 arithmetic of w8a8.py, so `backend: cpu` runs W8A8 checkpoints
    )
    # threads 0: torch's default. weights "model": float weights converted to model.dtype at load; "checkpoint":
    # a weight stored narrower than model.dtype (bf16 under a float32 run) stays as stored and is widened per op,
    # the same arithmetic at a fraction of the memory (how `moerun parity` fits its high-precision run).
    default_options = {"threads": 0, "weights": "model"}

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, key_path: str) -> dict[str, Any]:
        options = super().validate_options(options, key_path)
        if options["weights"] not in WEIGHTS_CHOICES:
            raise ConfigError(f"{key_path}.weights: {shown(options['weights'])} is not allowed "
                              f"(allowed: {', '.join(WEIGHTS_CHOICES)})")
        # Far more threads than cores only slows torch down; thousands make OpenMP crash the process.
        most = max_threads()
        if not 0 <= options["threads"] <= most:
            raise ConfigError(f"{key_path}.threads: {shown(options['threads'])} is out of range "
                              f"(allowed: 0..{most}, 0 = torch's default; this machine has {os.cpu_count()} CPUs)")
        return options

    def __init__(self, options: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__(options, dtype)
        if options.get("threads"):
            torch.set_num_threads(options["threads"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def weight_dtype(self, stored: torch.dtype) -> torch.dtype:
        keep = self.options.get("weights") == "checkpoint" and stored.is_floating_point and stored.itemsize < self.dtype.itemsize
        return stored if keep else self.dtype

    def prepare_linear(self, w: LinearWeight | W8A8LinearWeight):
        return w if isinstance(w, W8A8LinearWeight) else w.weight

    def prepare_experts(self, w):
        return w  # built on the host, which is this backend's device

    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        return ops.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata) -> None:
        ops.write_kv(kv_cache, k, v, meta.slot_mapping)

    def linear(self, x, w):
        return w8a8.linear(x, w) if isinstance(w, W8A8LinearWeight) else ops.linear(x, w)

    def rms_norm(self, x, weight, eps):
        return ops.rms_norm(x, weight, eps)

    def rotary(self, q, k, cos, sin):
        return ops.rotary(q, k, cos, sin)

    def attention(self, q, kv_cache, meta: AttentionMetadata, scale):
        plan = meta.derived.get("cpu_attention_plan")
        if plan is None:
            plan = meta.derived["cpu_attention_plan"] = ops.attention_plan(
                meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables, kv_cache, q.dtype)
        return ops.attention(q, kv_cache, meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables, scale, plan)

    def route(self, router_logits, bias, top_k):
        return ops.route(router_logits, bias, top_k)

    def experts(self, x, weights, ids, experts):
        if isinstance(experts, W8A8ExpertWeights):
            return w8a8.experts(x, weights, ids, experts)
        return ops.experts(x, weights, ids, experts.w13, experts.w2, experts.first_expert)


def max_threads() -> int:
    return 4 * (os.cpu_count() or 1)
