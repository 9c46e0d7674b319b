"""Which part of the model one rank holds, and whether a layout can work at all.

A world of N ranks runs one copy of the model:
  attention   heads split over `tp` ranks (a TP group); the N / tp TP groups compute the same attention (the tokens
              are replicated: no DP-attention yet). KV heads split too, replicated when tp > num_kv_heads.
  experts     split over `ep` ranks, contiguous (E / ep each); when ep < N each expert's intermediate is split
              over the N / ep ranks that share the expert group, so every rank holds 1/N of the expert bytes.
  vocabulary  the embedding and lm_head rows split over all N ranks (ceil(V / N) each, the last ones shorter).
Everything else (norms, router, correction bias) is replicated. Rank r is TP rank r % tp of TP group r // tp, and
holds expert group r // (N / ep), intermediate slice r % (N / ep).

The loader reads exactly these slices, the graph runs on them, and `moerun plan` sizes memory by them.
"""

from __future__ import annotations

import dataclasses

from moerun.backends.errors import ConfigError
from moerun.runtime.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    world_size: int = 1
    rank: int = 0
    tp: int = 1  # attention tensor-parallel size
    ep: int = 1  # expert-parallel size; N / ep ranks split each expert's intermediate

    def __post_init__(self) -> None:
        n = self.world_size
        if not 0 <= self.rank < n:
            raise ConfigError(f"rank {self.rank} is outside the world of {n}")
        for key, size in (("tensor_parallel_size", self.tp), ("expert_parallel_size", self.ep)):
            if size < 1 or n % size:
                raise ConfigError(f"parallel.{key}: {size} does not divide the world size {n} "
                                  f"(WORLD_SIZE; allowed: {', '.join(map(str, divisors(n)))})")

    # ---- groups ------------------------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def expert_splits(self) -> int:
        """How many ranks share each expert group (each holding a slice of the intermediate)."""
        return self.world_size // self.ep

    def tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.world_size // self.tp)]

    # ---- attention -----------------------------------------------------------------------------------------------
    def local_heads(self, num_heads: int) -> range:
        per_rank = num_heads // self.tp
        return range(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)

    def kv_replicas(self, num_kv_heads: int) -> int:
        """How many TP ranks hold each KV head: 1 unless tp > num_kv_heads."""
        return max(1, self.tp // num_kv_heads)

    def local_kv_heads(self, num_kv_heads: int) -> range:
        per_rank = max(1, num_kv_heads // self.tp)
        first = (self.tp_rank // self.kv_replicas(num_kv_heads)) * per_rank
        return range(first, first + per_rank)

    def counts_kv_norm(self, num_kv_heads: int) -> bool:
        """Whether this rank's k sum of squares enters the QK-norm all-reduce: with replicated KV heads only the
        first replica of each counts, so the sum over the TP group is the sum over all KV heads, exactly."""
        return self.tp_rank % self.kv_replicas(num_kv_heads) == 0

    # ---- experts -------------------------------------------------------------------------------------------------
    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep
        group = self.rank // self.expert_splits
        return range(group * per_rank, (group + 1) * per_rank)

    def local_intermediate(self, intermediate_size: int) -> range:
        per_rank = intermediate_size // self.expert_splits
        part = self.rank % self.expert_splits
        return range(part * per_rank, (part + 1) * per_rank)

    # ---- vocabulary ----------------------------------------------------------------------------------------------
    def vocab_rows_per_rank(self, vocab_size: int) -> int:
        return -(-vocab_size // self.world_size)

    def local_vocab(self, vocab_size: int) -> range:
        per_rank = self.vocab_rows_per_rank(vocab_size)
        start = min(self.rank * per_rank, vocab_size)
        return range(start, min(start + per_rank, vocab_size))

    # ---- the slice of each tensor -----------------------------------------------------------------------------------
    def tensor_slice(self, field: str, cfg: ModelConfig) -> tuple[range | None, range | None]:
        """(rows, columns) of a LayerWeights / ModelWeights field that this rank holds; None = all of them.
        Experts are sliced by local_experts and local_intermediate (the loader stacks them)."""
        d = cfg.head_dim
        heads = _scaled(self.local_heads(cfg.num_heads), d)
        kv_heads = _scaled(self.local_kv_heads(cfg.num_kv_heads), d)
        return {
            "q_proj": (heads, None), "q_norm": (heads, None),
            "k_proj": (kv_heads, None), "v_proj": (kv_heads, None), "k_norm": (kv_heads, None),
            "o_proj": (None, heads),  # row-parallel: its input columns are the heads' outputs
            "embed": (self.local_vocab(cfg.vocab_size), None), "lm_head": (self.local_vocab(cfg.vocab_size), None),
        }.get(field, (None, None))

    # ---- what cannot work -------------------------------------------------------------------------------------------
    def check(self, shape: ModelConfig, fp8_block: tuple[int, int] | None) -> list[str]:
        """Refuse a layout the model cannot take (ConfigError, one line naming the tensors that do not split and
        the sizes that would); return the notes an operator should see (replicated KV heads). fp8_block: the block
        of FP8 weights the backend executes as stored, else None (a dequantized checkpoint splits anywhere,
        exactly; so do int8 W8A8 channels, each a whole output row with its own scale)."""
        heads, kv, tp = shape.num_heads, shape.num_kv_heads, self.tp
        refusal = self._attention_refusal(shape, tp)
        if refusal:
            allowed = [t for t in divisors(self.world_size) if self._attention_refusal(shape, t) is None]
            what, tensors = refusal
            raise ConfigError(f"parallel.tensor_parallel_size: {what} ({tensors}; allowed in a world of "
                              f"{self.world_size}: {', '.join(map(str, allowed))})")
        if shape.num_experts % self.ep:
            raise ConfigError(f"parallel.expert_parallel_size: {self.ep} does not divide the {shape.num_experts} "
                              f"experts (allowed: {', '.join(map(str, divisors(shape.num_experts)))})")
        splits, inter = self.expert_splits, shape.intermediate_size
        if inter % splits:
            allowed = [e for e in divisors(self.world_size)
                       if shape.num_experts % e == 0 and inter % (self.world_size // e) == 0]
            raise ConfigError(f"parallel: intermediate {inter} / {splits} ranks per expert is not a whole number "
                              f"(the experts' w1/w3 rows, w2 columns; expert_parallel_size allowed in a world of "
                              f"{self.world_size}: {', '.join(map(str, allowed)) or 'none'})")
        if fp8_block is not None:
            bn, bk = fp8_block
            if splits > 1 and (inter // splits) % bn:
                raise ConfigError(f"parallel: intermediate {inter} / {splits} = {inter // splits} is not a multiple "
                                  f"of the FP8 block {bn}: use expert parallelism (expert_parallel_size "
                                  f"{self.world_size})")
            # q/k/v rows split at head edges, and o_proj's columns with q's rows: each must be a block edge
            d = shape.head_dim
            for what, rows, block in (("query", heads // tp * d, bn), ("o_proj input", heads // tp * d, bk),
                                      ("KV", max(1, kv // tp) * d, bn)):
                if tp > 1 and rows % block:
                    raise ConfigError(f"parallel.tensor_parallel_size: {tp} gives each rank {rows} {what} rows, "
                                      f"not a multiple of the FP8 block {block}")
        notes = []
        if tp > kv:
            notes.append(f"tensor_parallel_size {tp} > {kv} KV heads: each KV head is replicated on "
                         f"{self.kv_replicas(kv)} ranks (its cache too)")
        return notes

    @staticmethod
    def _attention_refusal(shape: ModelConfig, tp: int) -> tuple[str, str] | None:
        """Why attention cannot split over tp ranks (at head edges, a rank's query heads on one KV head) and the
        tensors concerned, or None."""
        heads, kv = shape.num_heads, shape.num_kv_heads
        if heads % tp:
            return f"{tp} does not divide the {heads} attention heads", "q_proj rows, o_proj columns"
        if tp <= kv and kv % tp:
            return f"{tp} does not divide the {kv} KV heads", "k_proj and v_proj rows"
        if tp > kv and tp % kv:
            return (f"{tp} is more than the {kv} KV heads and not a multiple of them, so a rank's query heads would "
                    f"need two KV heads", "k_proj and v_proj rows")
        return None

    def describe(self) -> str:
        splits = f", each expert's intermediate split {self.expert_splits} ways" if self.expert_splits > 1 else ""
        return f"{self.world_size} ranks: TP{self.tp} x EP{self.ep}{splits}"


def _scaled(r: range, factor: int) -> range:
    """A range of heads as the range of their rows (factor = head_dim)."""
    return range(r.start * factor, r.stop * factor)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
