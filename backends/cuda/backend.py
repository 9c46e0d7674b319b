"""The CUDA backend: the graph's ops as Triton kernels (plus cuBLAS for bf16 dense matmuls and torch's grouped
GEMM for bf16 prefill experts), FP8 block weights executed as stored, and decode steps replayed as CUDA graphs.

This module imports without Triton or a GPU (the YAML validation imports every backend class): the kernels are
imported when a backend is built. Building one fails with a single line when the device cannot run the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moerun.backends.base import (
    AttentionMetadata, Backend, Capabilities, ExpertWeights, LinearWeight, ModelSpec, device_of_local_rank)
from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.backends.cuda import device as dev
from moerun.backends.errors import ConfigError, UnsupportedModelError, shown

# Option values that are names, and what each allows.
_CHOICES = {
    "fp8": ("auto", "on", "off"),  # auto: keep FP8 checkpoints in FP8 where the GPU has FP8 tensor cores
    "grouped_mm": ("auto", "on", "off"),  # torch._grouped_mm for bf16 prefill experts; auto: Hopper, large steps
}
MAX_GRAPH_BATCH = 4096  # one captured graph per batch bucket up to this; beyond, graphs cost memory for nothing
# Below this many token-expert pairs the Triton grouped GEMM (thin M tiles) beats a general grouped GEMM.
GROUPED_MM_MIN_PAIRS = 4096


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        kv_block_sizes=(16, 32, 64, 128, 256),
        fp8_weights=True,  # narrowed per instance: see __init__
        dequantize_on_device=True,  # when FP8 is off, the GPU dequantizes at load far faster than the host
    )
    default_options = {
        "device": "cuda:0",
        "fp8": "auto",
        "cuda_graphs": True,
        "graph_max_batch": 256,
        "grouped_mm": "auto",
    }

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, key_path: str) -> dict[str, Any]:
        options = super().validate_options(options, key_path)
        for key, allowed in _CHOICES.items():
            if options[key] not in allowed:
                raise ConfigError(f"{key_path}.{key}: {shown(options[key])} is not allowed (allowed: {', '.join(allowed)})")
        if not 1 <= options["graph_max_batch"] <= MAX_GRAPH_BATCH:
            raise ConfigError(f"{key_path}.graph_max_batch: {shown(options['graph_max_batch'])} is out of range "
                              f"(allowed: 1..{MAX_GRAPH_BATCH})")
        return options

    @classmethod
    def options_for_rank(cls, options: dict[str, Any], local_rank: int, world_size: int) -> dict[str, Any]:
        return {**options, "device": device_of_local_rank(options["device"], local_rank)}

    @classmethod
    def keeps_fp8(cls, options: dict[str, Any]) -> bool:
        return options.get("fp8", "auto") != "off"  # every GPU a deployment plans for (sm89+) runs FP8

    @property
    def process_group_backend(self) -> str:
        return "nccl" if self._device.type == "cuda" else "gloo"  # gloo under Triton's interpreter

    def __init__(self, options: dict[str, Any], dtype: torch.dtype) -> None:
        options = self.validate_options(options, "cuda")
        super().__init__(options, dtype)
        self._device = dev.resolve_device(options["device"])
        self._name = dev.device_name(self._device)
        if dtype == torch.bfloat16 and not dev.supports_bf16(self._device):
            raise UnsupportedModelError(f"model.dtype bfloat16 needs an Ampere or newer GPU; {self._name} has none "
                                        "(use float16 or float32)")
        can_fp8 = dev.supports_fp8(self._device)
        if options["fp8"] == "on" and not can_fp8:
            raise UnsupportedModelError(f"cuda.fp8: on needs FP8 tensor cores (sm89 or newer); {self._name} has none "
                                        "(fp8: auto or off dequantizes FP8 checkpoints at load)")
        # The loader reads capabilities from the instance: FP8 weights come to us raw only when we execute them.
        self.fp8 = options["fp8"] != "off" and can_fp8
        self.capabilities = dataclasses.replace(type(self).capabilities, fp8_weights=self.fp8)
        self._grouped_mm = self._resolve_grouped_mm(options["grouped_mm"], dtype)
        self._sms = dev.num_sms(self._device)
        self._graph_mode = False

        from moerun.backends.cuda import attention, fp8, kv_cache, moe, norm_rope, routing  # imports Triton

        self.k = types.SimpleNamespace(attention=attention, fp8=fp8, kv_cache=kv_cache, moe=moe, norm_rope=norm_rope,
                                       routing=routing)

    def _resolve_grouped_mm(self, mode: str, dtype: torch.dtype) -> bool:
        available = hasattr(torch, "_grouped_mm")
        if mode == "on" and not available:
            raise UnsupportedModelError(f"cuda.grouped_mm: on needs torch._grouped_mm, which torch {torch.__version__} lacks")
        if mode == "off" or dtype != torch.bfloat16 or not available:
            return False
        if mode == "on":
            return True
        cc = dev.compute_capability(self._device)
        return cc is not None and cc >= (9, 0)

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        graphs = "on" if self.options["cuda_graphs"] and self._device.type == "cuda" else "off"
        return f"cuda backend on {self._device} ({self._name}), fp8 weights {'on' if self.fp8 else 'off'}, cuda graphs {graphs}"

    def device_info(self) -> dict[str, Any]:
        """name, memory_total and memory_free (bytes; None when unknown) of this backend's device."""
        if self._device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self._device)
            return {"name": self._name, "memory_total": total, "memory_free": free}
        return {"name": self._name, "memory_total": None, "memory_free": None}

    def check_model(self, spec: ModelSpec) -> None:
        def refuse(what: str) -> None:
            raise UnsupportedModelError(f"backend cuda: {what}")

        if spec.dtype not in self.capabilities.dtypes:
            refuse(f"dtype {spec.dtype} is not supported (bfloat16, float16, float32)")
        if spec.kv_block_size not in self.capabilities.kv_block_sizes:
            refuse(f"kv_cache.block_size {spec.kv_block_size} is not supported (allowed: "
                   f"{', '.join(map(str, self.capabilities.kv_block_sizes))})")
        if spec.head_dim > 256:
            refuse(f"head_dim {spec.head_dim} is above the attention kernels' 256")
        if spec.num_heads % spec.num_kv_heads:
            refuse(f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} kv heads")
        if spec.num_experts > 1024 or not 1 <= spec.top_k <= min(spec.num_experts, 64):
            refuse(f"{spec.num_experts} experts with top-{spec.top_k}: the routing kernel takes up to 1024 experts, top-k <= 64")
        if spec.fp8_block is None and self.options["fp8"] == "on":
            refuse("cuda.fp8 is on but the checkpoint is not FP8 (no quantization_config); use fp8: auto")
        if spec.fp8_block is not None and self.fp8:
            self.k.fp8.check_block(spec.fp8_block)
            if spec.intermediate_size % spec.fp8_block[0]:
                refuse(f"intermediate_size {spec.intermediate_size} is not a multiple of the FP8 block {spec.fp8_block[0]}")

    # ---- weights -----------------------------------------------------------------------------------------------
    def prepare_linear(self, w: LinearWeight) -> Any:
        if w.scale_inv is None:
            return w.weight.to(self._device).contiguous()
        if self.fp8:
            return self.k.fp8.prepare(w, self._device)
        return dequantize_fp8_block(w.weight.to(self._device), w.scale_inv.to(self._device), w.block, self.dtype)

    def prepare_experts(self, w: ExpertWeights) -> ExpertWeights:
        move = lambda t: t.to(self._device).contiguous()  # noqa: E731
        shard = {"first_expert": w.first_expert, "layer_experts": w.layer_experts}
        if w.w13_scale_inv is None:
            return ExpertWeights(w13=move(w.w13), w2=move(w.w2), **shard)
        if not self.fp8:
            return ExpertWeights(w13=dequantize_fp8_block(move(w.w13), move(w.w13_scale_inv), w.block, self.dtype),
                                 w2=dequantize_fp8_block(move(w.w2), move(w.w2_scale_inv), w.block, self.dtype),
                                 **shard)
        self.k.fp8.check_block(w.block)
        return ExpertWeights(w13=move(w.w13), w2=move(w.w2), w13_scale_inv=move(w.w13_scale_inv).float(),
                             w2_scale_inv=move(w.w2_scale_inv).float(), block=tuple(w.block), **shard)

    # ---- KV cache ----------------------------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype):
        return self.k.kv_cache.allocate(num_blocks, block_size, num_kv_heads, head_dim, dtype, self._device)

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata) -> None:
        self.k.kv_cache.write(kv_cache, k, v, meta.slot_mapping)

    # ---- ops ---------------------------------------------------------------------------------------------------
    def linear(self, x, w):
        if isinstance(w, self.k.fp8.Fp8Linear):
            return self.k.fp8.linear(x, w)
        return F.linear(x, w)

    def rms_norm(self, x, weight, eps):
        return self.k.norm_rope.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.k.norm_rope.add_rms_norm(x, residual, weight, eps)

    def rotary(self, q, k, cos, sin):
        return self.k.norm_rope.rotary(q, k, cos, sin)

    def attention(self, q, kv_cache, meta: AttentionMetadata, scale):
        if not meta.is_decode:
            return self.k.attention.prefill(q, kv_cache, meta, scale)
        if self._capturing():  # the host may not read the device: bound the lengths by the table capacity
            bound = meta.block_tables.shape[1] * meta.block_size
        else:
            bound = meta.max_seq_len
        return self.k.attention.decode(q, kv_cache, meta, scale, bound, self._sms)

    def route(self, router_logits, bias, top_k):
        return self.k.routing.route(router_logits, bias, top_k)

    def experts(self, x, weights, ids, experts):
        if not experts.holds_all_experts:
            # Another rank's pairs run on local expert 0 with weight 0 (exact, and capture-safe: no host sync);
            # skipping them in the routing kernel, or all-to-all dispatch (DeepEP), is next.
            local = ids - experts.first_expert
            foreign = (local < 0) | (local >= experts.w13.shape[0])
            weights, ids = weights.masked_fill(foreign, 0), local.masked_fill(foreign, 0)
        if (self._grouped_mm and experts.w13_scale_inv is None and x.dtype == torch.bfloat16
                and ids.numel() >= (GROUPED_MM_MIN_PAIRS if self.options["grouped_mm"] == "auto" else 0)
                and not self._capturing()):
            return self.k.moe.experts_grouped_mm(x, weights, ids, experts)
        return self.k.moe.experts_triton(x, weights, ids, experts)

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # ---- decode graphs -----------------------------------------------------------------------------------------
    def decode_runner(self, forward: Callable[..., torch.Tensor], max_num_seqs: int,
                      max_blocks_per_seq: int) -> Callable[..., torch.Tensor]:
        """forward(input_ids, positions, meta, kv_caches, observe=None) for decode steps: replayed from CUDA graphs
        captured per batch-size bucket (cuda_graphs: true on a GPU), else forward itself."""
        if not self.options["cuda_graphs"] or self._device.type != "cuda":
            return forward
        from moerun.backends.cuda.graphs import DecodeGraphs

        return DecodeGraphs(self, forward, min(max_num_seqs, self.options["graph_max_batch"]), max_blocks_per_seq)

    @contextlib.contextmanager
    def graph_mode(self):
        """Inside this block the ops take capture-safe paths (no device-to-host reads, launch shapes fixed by
        host-known bounds). The graph runner's warm-up and its capture both run under it, so the kernels the
        warm-up compiles are exactly the ones the capture records."""
        self._graph_mode = True
        try:
            yield
        finally:
            self._graph_mode = False

    def _capturing(self) -> bool:
        return self._graph_mode or (self._device.type == "cuda" and torch.cuda.is_current_stream_capturing())
