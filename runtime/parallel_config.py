"""The YAML `parallel:` section: how a world of ranks (torchrun's WORLD_SIZE) splits the model.

    parallel:
      tensor_parallel_size: 1     # attention heads split over this many ranks (a TP group)
      expert_parallel_size: null  # experts split over this many ranks; null: the world size
      init_timeout_s: 600         # process-group timeout: joining, and any one collective

Its keys' types and ranges are checked with the rest of the YAML (runtime/run_config.py); the sizes against the
world here, and against the model when the engine is built (ShardPlan.check), where what cannot work is one line.
"""

from __future__ import annotations

import dataclasses

from moerun.backends.errors import ConfigError
from moerun.runtime.shard_plan import ShardPlan


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
