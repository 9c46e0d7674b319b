"""W8A8 checkpoints for tests: transformers-saved checkpoints through `moerun quantize --w8a8`, and the model weights
of one assembled through runtime/w8a8_format + runtime/w8a8_weights, the calls the loader makes once it reads W8A8
(issue 11 item 1). Until then, W8A8Loader stands in for WeightLoader inside an Engine."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from moerun.backends.base import Backend, LinearWeight
from moerun.runtime import loader, w8a8_format, w8a8_weights
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.weights import LayerWeights, ModelWeights

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int:
    match = LAYER.match(name)
    return int(match.group(1)) if match else -1


def numpy_quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-output-channel symmetric int8 in numpy: scale = max|w| / 127 per row in float32 (1 for an
    all-zero row), q = w / scale in float32 (IEEE division, as torch's), rounded half to even: (q int8, scale [out])."""
    w = weight.astype(np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    return np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8), scale


class W8A8Loader:
    """WeightLoader's interface over a W8A8 checkpoint: W8A8_DYNAMIC modules through w8a8_weights, float tensors
    read as the float loader reads them."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, backend: Backend, plan=None) -> None:
        self.ckpt, self.cfg, self.backend = ckpt, cfg, backend
        self.description = w8a8_format.read_description(ckpt.folder)

    def load(self, num_layers: int, progress=None) -> ModelWeights:
        ckpt, cfg = self.ckpt, self.cfg
        expected = w8a8_format.expected_tensors(loader.expected_tensors(cfg, num_layers), self.description)
        w8a8_format.check_description_matches(self.description, ckpt.file_of)
        w8a8_format.check_tensors(ckpt.file_of, expected, lambda name: (ckpt.shape(name), ckpt.dtype(name)),
                                  ignored=lambda name: _layer_of(name) >= num_layers)
        layers = [self._layer(i) for i in range(num_layers)]
        embed = self._dense("model.embed_tokens.weight")
        lm_head = self._linear("lm_head") if not cfg.tie_word_embeddings else self.backend.prepare_linear(
            LinearWeight(embed))
        return ModelWeights(embed=embed, layers=layers, norm=self._dense("model.norm.weight"), lm_head=lm_head)

    def _dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.ckpt.read(name).to(self.backend.device, dtype or self.backend.dtype)

    def _linear(self, module: str):
        if self.description.is_quantized(module):
            return w8a8_weights.linear(self.ckpt, module, self.backend)
        return self.backend.prepare_linear(LinearWeight(self.ckpt.read(f"{module}.weight").to(self.backend.dtype)))

    def _layer(self, i: int) -> LayerWeights:
        p, cfg = f"model.layers.{i}", self.cfg
        assert self.description.is_quantized(f"{p}.block_sparse_moe.experts.0.w1")
        experts = w8a8_weights.experts(self.ckpt, f"{p}.block_sparse_moe", list(range(cfg.num_experts)),
                                       cfg.intermediate_size, cfg.hidden_size, self.backend)
        return LayerWeights(
            input_norm=self._dense(f"{p}.input_layernorm.weight"),
            q_proj=self._linear(f"{p}.self_attn.q_proj"), k_proj=self._linear(f"{p}.self_attn.k_proj"),
            v_proj=self._linear(f"{p}.self_attn.v_proj"), o_proj=self._linear(f"{p}.self_attn.o_proj"),
            q_norm=self._dense(f"{p}.self_attn.q_norm.weight"), k_norm=self._dense(f"{p}.self_attn.k_norm.weight"),
            post_attention_norm=self._dense(f"{p}.post_attention_layernorm.weight"),
            router=self._dense(f"{p}.block_sparse_moe.gate.weight", torch.float32),
            router_bias=self._dense(f"{p}.block_sparse_moe.e_score_correction_bias", torch.float32),
            experts=experts)


def quantize(src: Path, dst: Path, max_shard_size: str = "4GB") -> Path:
    from moerun.runtime.cli import main

    assert main(["quantize", "--w8a8", str(src), str(dst), "--max-shard-size", max_shard_size]) == 0
    return dst
