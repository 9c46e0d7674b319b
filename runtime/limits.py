"""What a run can hold, checked before any work: a request against the longest one the engine serves (before the
weights load), and the KV cache plus the weights against the device's free memory (before the first tensor is
read). Each refusal is one line with the numbers and what to change."""

from __future__ import annotations

import dataclasses
import math

import torch

from moerun.backends.base import Backend, get_backend_class
from moerun.backends.errors import ConfigError, MoerunError
from moerun.runtime.loader import expected_tensors
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import RunConfig

GiB = 1 << 30
_STORED_BYTES = {"F8_E4M3": 1, "F32": 4}  # FP8 weights and their block scales, kept where a backend runs FP8


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


def weight_bytes(cfg: ModelConfig, num_layers: int, dtype: torch.dtype, keep_fp8: bool) -> int:
    """The loaded weights: the model dtype, the router in float32, FP8 tensors as stored where kept."""
    total = 0
    for name, (shape, stored) in expected_tensors(cfg, num_layers).items():
        if keep_fp8 and stored:
            size = _STORED_BYTES[stored]
        elif stored == "F32":  # a block scale, multiplied into the weight at load and dropped
            size = 0
        elif ".block_sparse_moe.gate." in name or name.endswith("e_score_correction_bias"):
            size = 4
        else:
            size = dtype.itemsize
        total += math.prod(shape) * size
    return total


def check_memory(backend: Backend, cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int) -> None:
    """Refuse a KV cache that cannot fit beside the weights, before any weight is loaded."""
    free = memory_available(backend)
    if free is None:
        return
    keep_fp8 = cfg.fp8_block is not None and backend.capabilities.fp8_weights
    weights = weight_bytes(cfg, num_layers, backend.dtype, keep_fp8)
    kv = kv_cache_bytes(cfg, num_layers, num_blocks, block_size, backend.dtype)
    if weights + kv <= free:
        return
    where = f"{_gib(free)} is available on {backend.device}"
    if weights > free:
        raise MoerunError(f"the weights of {num_layers} layers need {_gib(weights)} but {where}; "
                          f"load fewer layers (--layers, model.num_layers) or use a device with more memory")
    fits = (free - weights) // kv_cache_bytes(cfg, num_layers, 1, block_size, backend.dtype)
    raise MoerunError(f"kv_cache: {num_blocks} blocks of {block_size} tokens need {_gib(kv)} beside "
                      f"{_gib(weights)} of weights, but {where}; set kv_cache.num_blocks to at most {fits}")


def memory_available(backend: Backend) -> int | None:
    """Free bytes where the backend keeps tensors: its device's report, else the host's when that is where
    they live; None when unknown."""
    free = backend.device_info().get("memory_free")
    if free is None and backend.device.type == "cpu":
        free = host_memory_available()
    return free


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (it counts reclaimable page cache), narrowed by a cgroup v2 memory limit
    when the process runs under one (containers, CI runners); None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                used = int(f.read())
            with open("/sys/fs/cgroup/memory.stat", encoding="ascii") as f:
                reclaimable = int(dict(line.split() for line in f if line.strip()).get("inactive_file", 0))
            available = min(available, max(int(limit) - used + reclaimable, 0))
    except (OSError, ValueError):
        pass
    return available


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
