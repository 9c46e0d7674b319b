"""What a run can hold, checked before any work: a request against the longest one the engine serves (before the
weights load), and the KV cache plus the weights against the device's free memory (before the first tensor is
read). Each refusal is one line with the numbers and what to change."""

from __future__ import annotations

import dataclasses

import torch

from moerun.backends.base import Backend, get_backend_class
from moerun.backends.errors import ConfigError, MoerunError, ResourceError
from moerun.runtime.loader import FEWER_LAYERS
from moerun.runtime.memory import check_fits, count, memory_free
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import RunConfig

GiB = 1 << 30


def max_model_len(run: RunConfig, max_positions: int, cache_tokens: int) -> int:
    """scheduler.max_model_len, else the model's max_position_embeddings, within what the KV cache holds: every
    request that fits max_model_len then fits the cache alone, so it is refused at once or served eventually."""
    asked = run.scheduler.max_model_len
    if asked is not None and asked > max_positions:
        raise ConfigError(f"{run.source}: scheduler.max_model_len: {asked} is more than the model's "
                          f"max_position_embeddings {max_positions}")
    if asked is not None and asked > cache_tokens:
        raise ConfigError(f"{run.source}: scheduler.max_model_len: {asked} tokens do not fit the KV cache "
                          f"({cache_tokens} tokens: kv_cache.num_blocks x block_size); raise kv_cache.num_blocks")
    return asked or min(max_positions, cache_tokens)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # the most tokens one request may hold, prompt and completion together
    why: str  # what sets that number, for messages
    vocab_size: int

    @classmethod
    def of(cls, run: RunConfig, cfg: ModelConfig) -> RequestLimits:
        block_size = run.kv_block_size or get_backend_class(run.backend).capabilities.kv_block_sizes[0]
        cache = run.kv_num_blocks * block_size
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


def kv_cache_bytes(cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer, as the paged cache allocates them."""
    return 2 * num_layers * num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def check_memory(backend: Backend, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 weights: int) -> None:
    """Refuse weights (`weights` bytes, as the loader will hold them) or a KV cache that cannot fit beside them,
    before any weight is read."""
    free = memory_free(backend)
    if free is None:
        return
    check_fits(f"the weights of {count(num_layers, 'layer')}", weights, backend, FEWER_LAYERS)
    kv = kv_cache_bytes(cfg, num_layers, num_blocks, block_size, backend.dtype)
    if weights + kv <= free:
        return
    fits = (free - weights) // kv_cache_bytes(cfg, num_layers, 1, block_size, backend.dtype)
    raise ResourceError(f"kv_cache: {num_blocks} blocks of {block_size} tokens need {_gib(kv)} beside "
                        f"{_gib(weights)} of weights, but {_gib(free)} is available on {backend.device}; "
                        f"set kv_cache.num_blocks to at most {fits}")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
