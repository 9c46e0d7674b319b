"""Checkpoint -> ModelWeights on the backend's device.

Strict: the checkpoint must hold exactly the tensors the config implies (layers beyond num_hidden_layers, the
unpublished MTP modules, are ignored), each of the right shape and dtype; any difference is an error naming the
tensor and the file. FP8 block weights are dequantized into the model dtype on the device unless the backend
executes FP8 itself, in which case it receives the float8 weight and its block scales.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from moerun.backends.base import Backend, ExpertWeights, LinearWeight
from moerun.backends.cpu.ops import dequantize_fp8_block
from moerun.runtime.checkpoint import Checkpoint
from moerun.backends.errors import CheckpointError
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.shard_plan import ShardPlan
from moerun.runtime.weights import LayerWeights, ModelWeights

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exporters save; recomputed, never read
# The float dtypes validate_checkpoint lets through, by their safetensors names.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def _linear_shapes(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[int, int]]:
    """Every linear module of the model and its [out, in] shape."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"lm_head": (cfg.vocab_size, h)} if not cfg.tie_word_embeddings else {}
    for i in range(num_layers):
        p = layer_prefix(i)
        shapes[f"{p}.self_attn.q_proj"] = (cfg.num_heads * d, h)
        shapes[f"{p}.self_attn.k_proj"] = (cfg.num_kv_heads * d, h)
        shapes[f"{p}.self_attn.v_proj"] = (cfg.num_kv_heads * d, h)
        shapes[f"{p}.self_attn.o_proj"] = (h, cfg.num_heads * d)
        shapes[f"{p}.block_sparse_moe.gate"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            shapes[f"{p}.block_sparse_moe.experts.{e}.w1"] = (inter, h)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w3"] = (inter, h)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w2"] = (h, inter)
    return shapes


def is_quantized(cfg: ModelConfig, module: str) -> bool:
    """FP8 checkpoints quantize every linear except the modules_to_not_convert (gate and lm_head in M2)."""
    if cfg.fp8_block is None:
        return False
    return not any(module == m or module.endswith("." + m) or f".{m}." in f".{module}." for m in cfg.fp8_modules_not_converted)


def expected_tensors(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """name -> (shape, required safetensors dtype or None for 'any float')."""
    h = cfg.hidden_size
    out: dict[str, tuple[tuple[int, ...], str | None]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, h), None),
        "model.norm.weight": ((h,), None),
    }
    for i in range(num_layers):
        p = layer_prefix(i)
        out[f"{p}.input_layernorm.weight"] = ((h,), None)
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), None)
        out[f"{p}.self_attn.q_norm.weight"] = ((cfg.num_heads * cfg.head_dim,), None)
        out[f"{p}.self_attn.k_norm.weight"] = ((cfg.num_kv_heads * cfg.head_dim,), None)
        out[f"{p}.block_sparse_moe.e_score_correction_bias"] = ((cfg.num_experts,), None)
    for module, (rows, cols) in _linear_shapes(cfg, num_layers).items():
        if is_quantized(cfg, module):
            bn, bk = cfg.fp8_block
            out[f"{module}.weight"] = ((rows, cols), "F8_E4M3")
            out[f"{module}.weight_scale_inv"] = ((-(-rows // bn), -(-cols // bk)), "F32")
        else:
            out[f"{module}.weight"] = ((rows, cols), None)
    return out


def validate_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, num_layers: int) -> None:
    expected = expected_tensors(cfg, num_layers)
    problems = []
    for name in sorted(ckpt.names()):
        m = _LAYER.match(name)
        skipped_layer = m is not None and int(m.group(1)) >= num_layers  # MTP layers, or beyond a smoke cut
        tied_copy = cfg.tie_word_embeddings and name == "lm_head.weight"  # some exporters save the tied copy too
        if name not in expected and not skipped_layer and not tied_copy and not _IGNORED.search(name):
            problems.append(f"{name}: unexpected tensor in {ckpt.file_of[name].name}")
    for name, (shape, dtype) in expected.items():
        if name not in ckpt.file_of:
            problems.append(f"{name}: missing from checkpoint {ckpt.folder}")
            continue
        file = ckpt.file_of[name].name
        actual = ckpt.shape(name)
        if actual != shape:
            problems.append(f"{name}: shape {list(actual)} in {file}, expected {list(shape)} from config.json")
        actual_dtype = ckpt.dtype(name)
        if dtype is not None and actual_dtype != dtype:
            problems.append(f"{name}: dtype {actual_dtype} in {file}, expected {dtype}")
        if dtype is None and actual_dtype not in SAFETENSORS_DTYPES:
            problems.append(f"{name}: dtype {actual_dtype} in {file}, expected a float (F32, BF16, F16)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


class WeightLoader:
    """Reads each tensor once from the memory-mapped checkpoint and hands it to the backend.

    Linear and expert weights are assembled on the host (experts stacked per layer) and moved by the backend's
    prepare_* exactly once, so no layer is ever held twice on the device. FP8 weights are dequantized on the
    device when the backend allows it (fast), else on the host."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, backend: Backend, plan: ShardPlan | None = None) -> None:
        self.ckpt, self.cfg, self.backend = ckpt, cfg, backend
        self.plan = plan or ShardPlan()
        self.device, self.dtype = backend.device, backend.dtype
        # The backend runs FP8 itself, or we dequantize here.
        self.keep_fp8 = cfg.fp8_block is not None and backend.capabilities.fp8_weights
        self.dequant_device = backend.device if backend.capabilities.dequantize_on_device else torch.device("cpu")
        # The router gate and its bias stay fp32 whatever the model dtype (selection is knife-edge); float64 in a
        # float64 run.
        self.router_dtype = torch.promote_types(self.dtype, torch.float32)

    def load(self, num_layers: int, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
        """progress(layers_done, num_layers) after each layer."""
        validate_checkpoint(self.ckpt, self.cfg, num_layers)
        layers = []
        for i in range(num_layers):
            layers.append(self._layer(i))
            if progress:
                progress(i + 1, num_layers)
        embed = self._dense("model.embed_tokens.weight")
        lm_head = (self.backend.prepare_linear(LinearWeight(embed)) if self.cfg.tie_word_embeddings
                   else self._linear("lm_head"))
        return ModelWeights(embed=embed, layers=layers, norm=self._dense("model.norm.weight"), lm_head=lm_head)

    def _dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.ckpt.read(name).to(self.device, dtype or self.dtype)

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dev = self.dequant_device
        return dequantize_fp8_block(weight.to(dev), scale.to(dev), self.cfg.fp8_block, self.dtype)

    def _linear(self, module: str) -> object:
        weight = self.ckpt.read(f"{module}.weight")
        if not is_quantized(self.cfg, module):
            return self.backend.prepare_linear(LinearWeight(weight.to(self.backend.weight_dtype(weight.dtype))))
        scale = self.ckpt.read(f"{module}.weight_scale_inv")
        if self.keep_fp8:
            return self.backend.prepare_linear(LinearWeight(weight, scale, self.cfg.fp8_block))
        return self.backend.prepare_linear(LinearWeight(self._dequantize(weight, scale)))

    def _layer(self, i: int) -> LayerWeights:
        p = layer_prefix(i)
        return LayerWeights(
            input_norm=self._dense(f"{p}.input_layernorm.weight"),
            q_proj=self._linear(f"{p}.self_attn.q_proj"),
            k_proj=self._linear(f"{p}.self_attn.k_proj"),
            v_proj=self._linear(f"{p}.self_attn.v_proj"),
            o_proj=self._linear(f"{p}.self_attn.o_proj"),
            q_norm=self._dense(f"{p}.self_attn.q_norm.weight"),
            k_norm=self._dense(f"{p}.self_attn.k_norm.weight"),
            post_attention_norm=self._dense(f"{p}.post_attention_layernorm.weight"),
            router=self._dense(f"{p}.block_sparse_moe.gate.weight", self.router_dtype),
            router_bias=self._dense(f"{p}.block_sparse_moe.e_score_correction_bias", self.router_dtype),
            experts=self._experts(p),
        )

    def _experts(self, p: str) -> object:
        """Stack this rank's experts on the host into [E, 2I, H] (w1 rows, then w3 rows) and [E, H, I], in the
        checkpoint's storage dtype (float8 with block-scale stacks for FP8), then convert once and hand over."""
        cfg = self.cfg
        local = self.plan.local_experts(cfg.num_experts)
        h, inter = cfg.hidden_size, cfg.intermediate_size
        quantized = is_quantized(cfg, f"{p}.block_sparse_moe.experts.0.w1")
        # Gate and up rows share one [2I, H] stack, so FP8 stacks (with their scale stacks) need 2I to split at a
        # block edge. Otherwise (never in M2: 1536 = 12 x 128) each expert is dequantized before stacking.
        stacked_fp8 = quantized and inter % cfg.fp8_block[0] == 0
        if quantized and self.keep_fp8 and not stacked_fp8:
            raise CheckpointError(f"{p}: intermediate_size {inter} is not a multiple of the FP8 block "
                                  f"{cfg.fp8_block[0]}, which FP8 execution needs")
        first = self.ckpt.dtype(f"{p}.block_sparse_moe.experts.{local[0]}.w1.weight")
        store = (torch.float8_e4m3fn if stacked_fp8 else self.dtype if quantized
                 else self.backend.weight_dtype(SAFETENSORS_DTYPES[first]))
        w13 = torch.empty(len(local), 2 * inter, h, dtype=store)
        w2 = torch.empty(len(local), h, inter, dtype=store)
        s13 = s2 = None
        if stacked_fp8:
            bn, bk = cfg.fp8_block
            s13 = torch.empty(len(local), 2 * inter // bn, -(-h // bk), dtype=torch.float32)
            s2 = torch.empty(len(local), -(-h // bn), -(-inter // bk), dtype=torch.float32)
        parts = {"w1": (w13, s13, 0), "w3": (w13, s13, inter), "w2": (w2, s2, 0)}
        for slot, e in enumerate(local):
            for part, (dest, scale_dest, row0) in parts.items():
                module = f"{p}.block_sparse_moe.experts.{e}.{part}"
                weight = self.ckpt.read(f"{module}.weight")
                if quantized:
                    scale = self.ckpt.read(f"{module}.weight_scale_inv")
                    if stacked_fp8:
                        bn = cfg.fp8_block[0]
                        scale_dest[slot, row0 // bn:row0 // bn + scale.shape[0]] = scale
                    else:
                        weight = self._dequantize(weight, scale).cpu()
                dest[slot, row0:row0 + weight.shape[0]] = weight.to(store)
        if stacked_fp8 and self.keep_fp8:
            return self.backend.prepare_experts(ExpertWeights(w13, w2, s13, s2, block=cfg.fp8_block))
        if stacked_fp8:
            w13, w2 = self._dequantize(w13, s13), self._dequantize(w2, s2)
        return self.backend.prepare_experts(ExpertWeights(w13=w13, w2=w2))
