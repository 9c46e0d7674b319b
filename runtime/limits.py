"""What a run can hold, checked before any work: a request against the longest one the engine serves (before the
weights load), and the KV cache plus the weights against the device's free memory (before the first tensor is
read). Each refusal is one line with the numbers and what to change.

With kv_cache.num_blocks unset the cache is sized here, before loading, from the same free-memory reading and the
same weight count (this rank's share, WeightLoader.weight_bytes) that the check uses, by the arithmetic of
`moerun plan` (runtime/capacity.py)."""

from __future__ import annotations

import dataclasses

from moerun.backends.base import Backend, get_backend_class
from moerun.backends.errors import ConfigError, MoerunError, ResourceError
from moerun.runtime import capacity
from moerun.runtime.loader import FEWER_LAYERS
from moerun.runtime.memory import count, fits_in, format_bytes
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import MAX_KV_BLOCKS, RunConfig
from moerun.runtime.shard_plan import ShardPlan

GiB = 1 << 30


def max_model_len(run: RunConfig, max_positions: int, cache_tokens: int | None) -> int:
    """scheduler.max_model_len, else the model's max_position_embeddings, within what the KV cache holds: every
    request that fits max_model_len then fits the cache alone, so it is refused at once or served eventually.
    cache_tokens None: a cache not sized yet (kv_cache.num_blocks unset), so only the model's bound applies."""
    asked = run.scheduler.max_model_len
    if asked is not None and asked > max_positions:
        raise ConfigError(f"{run.source}: scheduler.max_model_len: {asked} is more than the model's "
                          f"max_position_embeddings {max_positions}")
    if cache_tokens is None:
        return asked or max_positions
    if asked is not None and asked > cache_tokens:
        how = "kv_cache.num_blocks x block_size" if run.kv_num_blocks else "what fits in kv_cache.memory_fraction"
        raise ConfigError(f"{run.source}: scheduler.max_model_len: {asked} tokens do not fit the KV cache "
                          f"({cache_tokens} tokens: {how}); raise kv_cache.num_blocks")
    return asked or min(max_positions, cache_tokens)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # the most tokens one request may hold, prompt and completion together
    why: str  # what sets that number, for messages
    vocab_size: int

    @classmethod
    def of(cls, run: RunConfig, cfg: ModelConfig) -> RequestLimits:
        # kv_cache.num_blocks unset: the cache is sized when the engine is built, which then refuses what it
        # cannot hold; before that only the model's bound is known.
        block_size = run.kv_block_size or get_backend_class(run.backend).capabilities.kv_block_sizes[0]
        cache = run.kv_num_blocks * block_size if run.kv_num_blocks else None
        limit = max_model_len(run, cfg.max_position_embeddings, cache)
        if run.scheduler.max_model_len is not None:
            why = f"scheduler.max_model_len {limit}"
        elif limit == cfg.max_position_embeddings:
            why = f"the model's max_position_embeddings {limit}"
        else:
            why = (f"the {cache} tokens the KV cache holds (kv_cache.num_blocks {run.kv_num_blocks} x block_size "
                   f"{block_size}); raise kv_cache.num_blocks")
        return cls(limit, why, cfg.vocab_size)

    def check_token_ids(self, token_ids: list[int], what: str = "--token-ids") -> None:
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.vocab_size:
                raise MoerunError(f"{what}: token id {t} at position {i} is outside the vocabulary "
                                  f"(allowed: 0..{self.vocab_size - 1})")

    def check_lengths(self, lengths: list[int], what: str) -> None:
        """`lengths`: the tokens each request will hold at its end (prompt plus new tokens). Requests in flight
        together may need more blocks than are free: the scheduler then preempts, so each must only fit alone.
        `what` says where the lengths come from, for the message."""
        longest = max(lengths)
        if longest > self.max_model_len:
            raise MoerunError(f"{what}: {longest} tokens in one sequence, more than {self.why}")


def kv_cache_bytes(cfg: ModelConfig, plan: ShardPlan, num_layers: int, num_blocks: int, block_size: int,
                   dtype: str) -> int:
    """K and V of every layer for this rank's KV heads, as the paged cache allocates them."""
    return num_blocks * block_size * capacity.kv_bytes_per_token(cfg, plan, dtype, num_layers)


def kv_blocks_that_fit(run: RunConfig, cfg: ModelConfig, plan: ShardPlan, backend: Backend, num_layers: int,
                       block_size: int, weights: int, free: int | None) -> int:
    """kv_cache.num_blocks unset: the blocks that fit in kv_cache.memory_fraction of the `free` bytes (read before
    loading) after this rank's `weights` and the step reserve (capacity.kv_tokens, as `moerun plan` counts); at most
    what max_num_seqs requests of the longest length could hold. This rank's number: all ranks take the smallest.
    May be below one block: the caller refuses that once the ranks agree."""
    if free is None:
        raise ConfigError(f"{run.source}: kv_cache.num_blocks: the {backend.name} backend does not report its free "
                          f"memory, so the KV cache cannot be sized from it: give num_blocks")
    sched = run.scheduler
    reserve = capacity.reserve_bytes(cfg, plan, run.dtype_name, sched.max_num_batched_tokens, sched.max_num_seqs,
                                     accelerator=backend.device.type != "cpu")
    per_token = capacity.kv_bytes_per_token(cfg, plan, run.dtype_name, num_layers)
    tokens = capacity.kv_tokens(free, run.kv_memory_fraction, weights, reserve, per_token)
    longest = sched.max_model_len or cfg.max_position_embeddings
    return min(tokens // block_size, sched.max_num_seqs * -(-longest // block_size), MAX_KV_BLOCKS)


def check_kv_blocks(run: RunConfig, backend: Backend, num_blocks: int, weights: int, free: int) -> None:
    """One line when no block fits (kv_blocks_that_fit, agreed over the ranks)."""
    if num_blocks >= 1:
        return
    raise ResourceError(
        f"no memory left for the KV cache on {backend.device}: {format_bytes(free)} free before loading, x "
        f"kv_cache.memory_fraction {run.kv_memory_fraction:g}, minus the weights ({format_bytes(weights)}) and the "
        f"step reserve leaves less than one block; use more devices, fewer layers, a smaller "
        f"scheduler.max_num_batched_tokens, or check `moerun plan`")


def check_weights(backend: Backend, plan: ShardPlan, num_layers: int, weights: int, free: int | None) -> None:
    """Refuse weights (`weights` bytes, as the loader will hold them on this rank) that cannot fit in the `free`
    bytes, before any weight is read or the KV cache is sized beside them."""
    share = f" (rank {plan.rank}'s share: {plan.describe()})" if plan.world_size > 1 else ""
    fits_in(f"the weights of {count(num_layers, 'layer')}{share}", weights, free, backend.device, FEWER_LAYERS)


def check_memory(run: RunConfig, backend: Backend, cfg: ModelConfig, plan: ShardPlan, num_layers: int,
                 num_blocks: int, block_size: int, weights: int, free: int | None) -> None:
    """Refuse a KV cache that cannot fit beside the weights (already checked alone) in the `free` bytes, before
    any weight is read."""
    if free is None:
        return
    kv = kv_cache_bytes(cfg, plan, num_layers, num_blocks, block_size, run.dtype_name)
    if weights + kv <= free:
        return
    fits = (free - weights) // kv_cache_bytes(cfg, plan, num_layers, 1, block_size, run.dtype_name)
    raise ResourceError(f"kv_cache: {num_blocks} blocks of {block_size} tokens need {_gib(kv)} beside "
                        f"{_gib(weights)} of weights, but {_gib(free)} is available on {backend.device}; "
                        f"set kv_cache.num_blocks to at most {fits}")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
