"""The YAML `parallel:` section: how a world of ranks (torchrun's WORLD_SIZE) splits the model.

    parallel:
      tensor_parallel_size: 1     # attention heads split over this many ranks (a TP group)
      expert_parallel_size: null  # experts split over this many ranks; null: the world size
      init_timeout_s: 600         # process-group timeout: joining, and any one collective

Checked here for its own types; checked against the world and the model when the engine is built
(ShardPlan.check), where what cannot work is one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moerun.backends.errors import ConfigError
from moerun.runtime.shard_plan import ShardPlan

_KEYS = {"tensor_parallel_size": int, "expert_parallel_size": int, "init_timeout_s": (int, float)}


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    expert_parallel_size: int | None = None  # None: the world size
    init_timeout_s: float = 600.0

    def plan(self, world_size: int, rank: int, source: str = "") -> ShardPlan:
        """This rank's ShardPlan in a world of world_size ranks; ConfigError when the sizes do not fit the world."""
        where = f"{source}: " if source else ""
        for key, size in (("tensor_parallel_size", self.tensor_parallel_size),
                          ("expert_parallel_size", self.expert_parallel_size)):
            if size is not None and (size > world_size or world_size % size):
                hint = (f"launch {size} ranks, e.g. torchrun --nproc-per-node {size} -m moerun ..." if world_size == 1
                        else f"allowed in a world of {world_size}: a divisor of it")
                raise ConfigError(f"{where}parallel.{key}: {size} does not fit the world of {world_size} ranks "
                                  f"(WORLD_SIZE); {hint}")
        return ShardPlan(world_size=world_size, rank=rank, tp=self.tensor_parallel_size,
                         ep=self.expert_parallel_size or world_size)


def parse_parallel_config(section: Any, source: str) -> ParallelConfig:
    if section is None:
        return ParallelConfig()
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: parallel: expected a mapping, got {section!r}")
    for key, value in section.items():
        if key not in _KEYS:
            raise ConfigError(f"{source}: parallel.{key}: unknown key (allowed: {', '.join(_KEYS)})")
        if value is None and key == "expert_parallel_size":
            continue
        kind = _KEYS[key]
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise ConfigError(f"{source}: parallel.{key}: expected a positive number, got {value!r}")
    return ParallelConfig(**{k: (float(v) if k == "init_timeout_s" else v) for k, v in section.items()})
