"""Sequences and the packed inputs of one forward step. Prefill, decode and a mix of both are the same thing
here: each sequence contributes the tokens that are not in the cache yet."""

from __future__ import annotations

import dataclasses

import torch

from moerun.backends.base import AttentionMetadata
from moerun.runtime.kv_cache import PagedKVCache


@dataclasses.dataclass
class Sequence:
    token_ids: list[int]
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # leading tokens whose K/V is already in the cache

    @property
    def num_new(self) -> int:
        return len(self.token_ids) - self.num_cached


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    last_token_rows: torch.Tensor  # int64 [B]: row of each sequence's last token in the packed batch


def build_step(seqs: list[Sequence], cache: PagedKVCache, device: torch.device) -> StepInputs:
    ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
    bs = cache.block_size
    for seq in seqs:
        if seq.num_new <= 0:
            raise ValueError("every sequence in a step needs at least one token not yet in the cache")
        cache.grow(seq.block_table, len(seq.token_ids))
        span = range(seq.num_cached, len(seq.token_ids))
        ids.extend(seq.token_ids[seq.num_cached:])
        positions.extend(span)
        slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
        query_lens.append(seq.num_new)
        seq_lens.append(len(seq.token_ids))
    width = max(len(s.block_table) for s in seqs)
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    def dev(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device)

    meta = AttentionMetadata(
        query_start_loc=dev(starts, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        block_tables=dev(tables, torch.int32),
        slot_mapping=dev(slots, torch.int64),
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
        block_size=bs,
    )
    return StepInputs(input_ids=dev(ids, torch.int64), positions=dev(positions, torch.int64), meta=meta,
                      last_token_rows=dev([e - 1 for e in starts[1:]], torch.int64))
