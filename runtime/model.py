"""The MiniMax-M2 graph, written once for every device: embedding -> decoder layers (attention + MoE) -> norm ->
lm_head. Every device-specific op goes through the backend; what stays here is device-agnostic torch
(embedding lookup, reshapes, the rotary angles and the fp32 router matmul)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moerun.backends.base import AttentionMetadata, Backend
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.weights import LayerWeights, ModelWeights


class MiniMaxM2Model:
    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Backend) -> None:
        self.config = config
        self.weights = weights
        self.backend = backend
        self.scale = config.head_dim ** -0.5
        # Frequencies span rotary_dim, not head_dim (partial RoPE): inv_freq[i] = theta^(-2i / rotary_dim).
        rot = config.rotary_dim
        self.inv_freq = (1.0 / (config.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))).to(backend.device)

    @property
    def num_layers(self) -> int:
        return len(self.weights.layers)

    def rotary_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim]: angles in fp32, rounded once to the model dtype (as transformers does)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.backend.dtype), emb.sin().to(self.backend.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[Any], observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Packed tokens [T] of one step -> final-norm hidden states [T, H]. Writes this step's K/V.
        `observe(name, tensor)`, when given, sees each layer's attention output, router logits and MoE output
        (how `moerun parity --per-layer` finds where two backends part)."""
        be = self.backend
        observe = observe or (lambda name, tensor: None)
        cos, sin = self.rotary_angles(positions)
        hidden = F.embedding(input_ids, self.weights.embed)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.weights.layers, kv_caches)):
            if residual is None:
                residual = hidden
                x = be.rms_norm(hidden, layer.input_norm, self.config.rms_norm_eps)
            else:
                x, residual = be.add_rms_norm(hidden, residual, layer.input_norm, self.config.rms_norm_eps)
            hidden = self._attention(layer, x, cos, sin, meta, kv_cache)
            observe(f"layer{i}.attention", hidden)
            x, residual = be.add_rms_norm(hidden, residual, layer.post_attention_norm, self.config.rms_norm_eps)
            # The router stays fp32 end to end (float64 in a float64 run), as the checkpoint stores it: bf16 routing
            # flips expert choices.
            router_logits = F.linear(x.to(layer.router.dtype), layer.router)
            observe(f"layer{i}.router_logits", router_logits)
            hidden = be.moe(x, router_logits, layer.router_bias, self.config.top_k, layer.experts)
            observe(f"layer{i}.moe", hidden)
        out, _ = be.add_rms_norm(hidden, residual, self.weights.norm, self.config.rms_norm_eps)
        observe("final_norm", out)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> fp32 [N, V]."""
        return self.backend.linear(hidden, self.weights.lm_head).float()

    def _attention(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: AttentionMetadata, kv_cache: Any) -> torch.Tensor:
        be, cfg = self.backend, self.config
        num_tokens = x.shape[0]
        # QK-norm spans all heads jointly (one RMSNorm over the flattened projection), before RoPE.
        q = be.rms_norm(be.linear(x, layer.q_proj), layer.q_norm, cfg.rms_norm_eps)
        k = be.rms_norm(be.linear(x, layer.k_proj), layer.k_norm, cfg.rms_norm_eps)
        v = be.linear(x, layer.v_proj)
        q = q.view(num_tokens, -1, cfg.head_dim)
        k = k.view(num_tokens, -1, cfg.head_dim)
        v = v.view(num_tokens, -1, cfg.head_dim)
        q, k = be.rotary(q, k, cos, sin)
        be.write_kv(kv_cache, k, v, meta)
        o = be.attention(q, kv_cache, meta, self.scale)
        return be.linear(o.reshape(num_tokens, -1), layer.o_proj)
