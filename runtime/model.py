"""The MiniMax-M2 graph, written once for every device: embedding -> decoder layers (attention + MoE) -> norm ->
lm_head. Every device-specific op goes through the backend; what stays here is device-agnostic torch
(embedding lookup, reshapes, the rotary angles and the fp32 router matmul) and the collectives.

On several ranks each holds its ShardPlan's slices and the graph adds the collectives that make the result exact
(docs/parallelism.md): the vocabulary-parallel embedding's all-reduce over the world, per layer the QK-norm's
sum-of-squares all-reduce and o_proj's all-reduce within the TP group and the MoE output's all-reduce over the
world, and the lm_head logits' all-gather. With one rank every collective is skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moerun.backends.base import AttentionMetadata, Backend
from moerun.runtime.communicator import Communicator
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.shard_plan import ShardPlan
from moerun.runtime.weights import LayerWeights, ModelWeights


class MiniMaxM2Model:
    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Backend,
                 comm: Communicator | None = None, plan: ShardPlan | None = None) -> None:
        self.config = config
        self.weights = weights
        self.backend = backend
        self.comm = comm or Communicator()
        self.plan = plan = plan or ShardPlan()
        self.scale = config.head_dim ** -0.5
        self.vocab = plan.local_vocab(config.vocab_size)
        # QK-norm statistics span all heads: each rank's sums of squares are added up over the TP group.
        self.q_norm_size = config.num_heads * config.head_dim
        self.k_norm_size = config.num_kv_heads * config.head_dim
        self.counts_kv_norm = plan.counts_kv_norm(config.num_kv_heads)
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
        hidden = self._embed(input_ids)
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
            # Each rank computes its experts (and intermediate slice) for the tokens routed to them; the sum over
            # the world is the whole MoE output (tokens are replicated, so no all-to-all is needed).
            hidden = self.comm.world.all_reduce(be.moe(x, router_logits, layer.router_bias, self.config.top_k,
                                                       layer.experts))
            observe(f"layer{i}.moe", hidden)
        out, _ = be.add_rms_norm(hidden, residual, self.weights.norm, self.config.rms_norm_eps)
        observe("final_norm", out)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> fp32 [N, V], on every rank (each computes its vocabulary rows, then they are gathered)."""
        local = self.backend.linear(hidden, self.weights.lm_head).float()
        world = self.comm.world
        if world.size == 1:
            return local
        per_rank = self.plan.vocab_rows_per_rank(self.config.vocab_size)
        if local.shape[1] < per_rank:  # the last ranks' rows run short of an even split
            local = F.pad(local, (0, per_rank - local.shape[1]))
        gathered = world.all_gather(local)  # [ranks, N, per_rank]
        return gathered.permute(1, 0, 2).reshape(hidden.shape[0], -1)[:, :self.config.vocab_size]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows are split over the world: each rank looks up the ids it holds, zeros elsewhere, and
        the sum over the world is exact (one non-zero term per token)."""
        if self.comm.world.size == 1:
            return F.embedding(input_ids, self.weights.embed)
        local = input_ids - self.vocab.start
        mine = (local >= 0) & (local < len(self.vocab))
        rows = F.embedding(local.clamp(0, max(len(self.vocab) - 1, 0)), self.weights.embed) if len(self.vocab) else (
            self.weights.embed.new_zeros(input_ids.shape[0], self.config.hidden_size))
        return self.comm.world.all_reduce(rows * mine[:, None].to(rows.dtype))

    def _attention(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: AttentionMetadata, kv_cache: Any) -> torch.Tensor:
        be, cfg = self.backend, self.config
        num_tokens = x.shape[0]
        # QK-norm spans all heads jointly (one RMSNorm over the flattened projection), before RoPE.
        q, k, v = be.linear(x, layer.q_proj), be.linear(x, layer.k_proj), be.linear(x, layer.v_proj)
        if self.comm.tp.size == 1:
            q = be.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = be.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        else:
            q, k = self._sharded_qk_norm(q, k, layer)
        q = q.view(num_tokens, -1, cfg.head_dim)
        k = k.view(num_tokens, -1, cfg.head_dim)
        v = v.view(num_tokens, -1, cfg.head_dim)
        q, k = be.rotary(q, k, cos, sin)
        be.write_kv(kv_cache, k, v, meta)
        o = be.attention(q, kv_cache, meta, self.scale)
        return self.comm.tp.all_reduce(be.linear(o.reshape(num_tokens, -1), layer.o_proj))  # row-parallel o_proj

    def _sharded_qk_norm(self, q: torch.Tensor, k: torch.Tensor,
                         layer: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of q and k over all heads when this rank holds some: the fp32 sums of squares of both go through
        one all-reduce over the TP group (one buffer [T, 2]), then each rank normalizes its heads by
        rsqrt(sum / size_total + eps), as the one-device norm does (fp32 statistics, cast back, then scaled).
        A replicated KV head's sum is counted by its first replica only, so the total stays exact."""
        qf, kf = q.float(), k.float()
        sums = torch.stack((qf.pow(2).sum(-1), kf.pow(2).sum(-1) * self.counts_kv_norm), dim=-1)
        self.comm.tp.all_reduce(sums)
        eps = self.config.rms_norm_eps
        q_inv = torch.rsqrt(sums[:, :1] / self.q_norm_size + eps)
        k_inv = torch.rsqrt(sums[:, 1:] / self.k_norm_size + eps)
        return layer.q_norm * (qf * q_inv).to(q.dtype), layer.k_norm * (kf * k_inv).to(k.dtype)
