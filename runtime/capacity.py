"""Memory arithmetic of a layout, from config.json alone: the bytes of weights one rank holds, the KV bytes one
token costs it, the activation reserve of a step, and the KV tokens that fit in what is left.

    usable     = device memory x kv_cache.memory_fraction
    kv budget  = usable - weights per rank - reserve
    reserve    = workspace (communication buffers, device graphs; 0 on the CPU) + activations of the largest step
    KV tokens  = kv budget // KV bytes per token per rank

Every TP group holds the KV of all tokens for its heads (the groups are replicas: no DP-attention), so the tokens
that fit on one rank are the tokens the deployment holds. `moerun plan` prints this per layout; the engine sizes its
KV cache with the same functions from the free memory it finds (kv_cache.num_blocks unset). The formulas, and the
check against MiniMax's published figures, are in docs/parallelism.md.
"""

from __future__ import annotations

import dataclasses

from moerun.backends.base import DTYPES
from moerun.backends.errors import ConfigError
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.shard_plan import ShardPlan, divisors

GiB = 1 << 30
# Communication buffers (NCCL/HCCL), device-graph pools and allocator slack that no tensor of the graph accounts
# for: 1 GiB per accelerator rank (HCCL_BUFFSIZE defaults to 200 MB per communicator; vllm-ascend sets 512-1024 MB).
ACCELERATOR_WORKSPACE = 1 * GiB

# Weight formats: how the linears that a checkpoint quantizes are held in memory.
FP8 = "fp8"  # float8 e4m3 + one fp32 scale per block (executed as stored: CUDA on sm89+)
W8A8 = "w8a8"  # int8 + one fp32 scale per output channel (msModelSlim W8A8_DYNAMIC on Ascend)
FLOAT_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Format:
    """How the weights sit in memory: `linears` is FP8, W8A8 or a float dtype name; everything else (norms,
    embedding, lm_head) in `dtype`; the router always fp32."""

    linears: str
    dtype: str  # the model dtype: activations, KV cache, non-quantized weights
    fp8_block: tuple[int, int] = (128, 128)

    @property
    def name(self) -> str:
        return self.linears if self.linears in (FP8, W8A8) else self.dtype


def linear_bytes(rows: int, cols: int, fmt: Format) -> int:
    """One [rows, cols] linear (a rank's slice) that the checkpoint quantizes."""
    if fmt.linears == FP8:
        bn, bk = fmt.fp8_block
        return rows * cols + 4 * (-(-rows // bn)) * (-(-cols // bk))
    if fmt.linears == W8A8:
        return rows * cols + 4 * rows
    return rows * cols * FLOAT_BYTES[fmt.linears]


@dataclasses.dataclass(frozen=True)
class RankBytes:
    attention: int
    experts: int
    vocabulary: int  # embedding + lm_head rows
    replicated: int  # norms, router gate and bias

    @property
    def total(self) -> int:
        return self.attention + self.experts + self.vocabulary + self.replicated


def weight_bytes(cfg: ModelConfig, plan: ShardPlan, fmt: Format, num_layers: int | None = None) -> RankBytes:
    """Bytes of the weights one rank holds under `plan` (every rank holds the same amount, up to the vocabulary's
    last ranks, which may be short: the largest is counted)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    h, d, f = cfg.hidden_size, cfg.head_dim, FLOAT_BYTES[fmt.dtype]
    q_rows = len(plan.local_heads(cfg.num_heads)) * d
    kv_rows = len(plan.local_kv_heads(cfg.num_kv_heads)) * d
    experts = len(plan.local_experts(cfg.num_experts))
    inter = len(plan.local_intermediate(cfg.intermediate_size))
    attention = linear_bytes(q_rows, h, fmt) + 2 * linear_bytes(kv_rows, h, fmt) + linear_bytes(h, q_rows, fmt)
    # w1 and w3 are stacked into one [2I, H] per expert, so FP8 scales count per stack, as the loader builds them
    moe = experts * (linear_bytes(2 * inter, h, fmt) + linear_bytes(h, inter, fmt))
    norms = (2 * h + q_rows + kv_rows) * f
    router = 4 * (cfg.num_experts * h + cfg.num_experts)
    vocab_rows = plan.vocab_rows_per_rank(cfg.vocab_size)
    vocabulary = (1 if cfg.tie_word_embeddings else 2) * vocab_rows * h * f
    return RankBytes(attention=layers * attention, experts=layers * moe, vocabulary=vocabulary,
                     replicated=layers * (norms + router) + h * f)


def kv_bytes_per_token(cfg: ModelConfig, plan: ShardPlan, dtype: str, num_layers: int | None = None) -> int:
    """K and V of every layer for one token, for this rank's KV heads."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return layers * 2 * len(plan.local_kv_heads(cfg.num_kv_heads)) * cfg.head_dim * FLOAT_BYTES[dtype]


def activation_bytes(cfg: ModelConfig, plan: ShardPlan, dtype: str, max_num_batched_tokens: int,
                     max_num_seqs: int) -> int:
    """The live activations of the largest step, bounded from above: per token the residual, normed input and
    layer output (3H), this rank's q, k, v and attention output, fp32 router logits, and the MoE intermediates of
    every one of its top-k pairs (the worst case: all routed to this rank's experts); plus fp32 logits of
    max_num_seqs rows, this rank's columns and the gathered whole."""
    h, d, f = cfg.hidden_size, cfg.head_dim, FLOAT_BYTES[dtype]
    q = len(plan.local_heads(cfg.num_heads)) * d
    kv = len(plan.local_kv_heads(cfg.num_kv_heads)) * d
    inter = len(plan.local_intermediate(cfg.intermediate_size))
    per_token = f * (3 * h + 2 * q + 2 * kv + cfg.top_k * (3 * inter + h)) + 4 * cfg.num_experts
    logits = 4 * max_num_seqs * (plan.vocab_rows_per_rank(cfg.vocab_size) + cfg.vocab_size)
    return max_num_batched_tokens * per_token + logits


def reserve_bytes(cfg: ModelConfig, plan: ShardPlan, dtype: str, max_num_batched_tokens: int, max_num_seqs: int,
                  accelerator: bool) -> int:
    workspace = ACCELERATOR_WORKSPACE if accelerator else 0
    return workspace + activation_bytes(cfg, plan, dtype, max_num_batched_tokens, max_num_seqs)


def kv_tokens(memory: int, memory_fraction: float, weights: int, reserve: int, per_token: int) -> int:
    """The KV tokens that fit on one rank; negative when the weights and reserve alone overflow it."""
    return (int(memory * memory_fraction) - weights - reserve) // per_token


@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """One TP x EP layout of a world, sized on one rank (they all hold the same amount)."""

    tp: int
    ep: int
    refused: str | None  # why the layout cannot work at all
    notes: tuple[str, ...]
    weights: int = 0
    kv_per_token: int = 0
    reserve: int = 0
    kv_tokens: int = 0


def plan_layouts(cfg: ModelConfig, fmt: Format, memory: int, world: int, memory_fraction: float,
                 max_num_batched_tokens: int, max_num_seqs: int, accelerator: bool,
                 fp8_executed: bool) -> list[LayoutPlan]:
    """Every TP x EP layout of a world of `world` devices of `memory` bytes: refused, or sized."""
    out = []
    for tp in divisors(world):
        for ep in divisors(world):
            plan = ShardPlan(world_size=world, rank=0, tp=tp, ep=ep)
            try:
                notes = tuple(plan.check(cfg, cfg.fp8_block if fp8_executed else None))
            except ConfigError as e:
                out.append(LayoutPlan(tp, ep, str(e).removeprefix("parallel: "), ()))
                continue
            weights = weight_bytes(cfg, plan, fmt).total
            per_token = kv_bytes_per_token(cfg, plan, fmt.dtype)
            reserve = reserve_bytes(cfg, plan, fmt.dtype, max_num_batched_tokens, max_num_seqs, accelerator)
            out.append(LayoutPlan(tp, ep, None, notes, weights, per_token, reserve,
                                  kv_tokens(memory, memory_fraction, weights, reserve, per_token)))
    return out
