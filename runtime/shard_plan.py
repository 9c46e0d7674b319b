"""Which part of the model one rank holds. Today one rank holds everything; the loader already asks the plan
for its slices, so sharding attention heads and experts across ranks later changes the plan, not the loader."""

from __future__ import annotations

import dataclasses

from moerun.backends.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size != 1 or self.rank != 0:
            raise ConfigError("multi-device placement is not built yet: world_size must be 1 (see docs/architecture.md)")

    def local_experts(self, num_experts: int) -> range:
        """Expert parallelism: a contiguous slice of experts per rank."""
        per_rank = num_experts // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def local_heads(self, num_heads: int) -> range:
        """Tensor parallelism of attention: a contiguous slice of heads per rank."""
        per_rank = num_heads // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)
