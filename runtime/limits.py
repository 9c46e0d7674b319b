"""What a run can hold, checked before any work: a request against the model's positions and the KV cache's
capacity (before the weights load), and the KV cache plus the weights against the device's free memory
(before the first tensor is read). Each refusal is one line with the numbers and what to change."""

from __future__ import annotations

import dataclasses
import math

import torch

from moerun.backends.base import Backend, get_backend_class
from moerun.backends.errors import MoerunError
from moerun.runtime.loader import expected_tensors
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.run_config import RunConfig

GiB = 1 << 30
_STORED_BYTES = {"F8_E4M3": 1, "F32": 4}  # FP8 weights and their block scales, kept where a backend runs FP8


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_positions: int  # config.json max_position_embeddings
    vocab_size: int
    num_blocks: int
    block_size: int

    @classmethod
    def of(cls, run: RunConfig, cfg: ModelConfig) -> RequestLimits:
        block_size = run.kv_block_size or get_backend_class(run.backend).capabilities.kv_block_sizes[0]
        return cls(cfg.max_position_embeddings, cfg.vocab_size, run.kv_num_blocks, block_size)

    def check_token_ids(self, token_ids: list[int], what: str = "--token-ids") -> None:
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.vocab_size:
                raise MoerunError(f"{what}: token id {t} at position {i} is outside the vocabulary "
                                  f"(allowed: 0..{self.vocab_size - 1})")

    def check_lengths(self, lengths: list[int], what: str) -> None:
        """`lengths`: the tokens each sequence will hold at its end (prompt plus new tokens), all in flight
        together. `what` says where the lengths come from, for the message."""
        longest = max(lengths)
        if longest > self.max_positions:
            raise MoerunError(f"{what}: {longest} tokens in one sequence, more than the model's "
                              f"max_position_embeddings {self.max_positions}")
        blocks = sum(-(-n // self.block_size) for n in lengths)
        if blocks > self.num_blocks:
            raise MoerunError(f"{what}: {sum(lengths)} tokens need {blocks} KV cache blocks of {self.block_size}, "
                              f"more than kv_cache.num_blocks {self.num_blocks} "
                              f"({self.num_blocks * self.block_size} tokens); raise kv_cache.num_blocks")


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
