"""The packed inputs of one forward step, built once per step into persistent buffers (runtime/staging.py).

Each sequence contributes the tokens not yet in its cache (a whole prompt, a prompt chunk, or one decoded token),
packed along one axis T. AttentionMetadata carries the host lists too, so no backend re-derives them per layer.

A step's buffers are rewritten by the next build: the engine reads every result of a step (the sampled ids)
before it builds the next, which also orders the next uploads after the previous step's reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from moerun.backends.base import AttentionMetadata
from moerun.runtime.staging import StagingBuffer


@dataclasses.dataclass
class StepSequence:
    token_ids: Sequence[int]  # the tokens this step feeds
    start: int  # their first position = tokens already in the cache
    block_ids: Sequence[int]  # covering at least start + len(token_ids) tokens


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [N]: the rows of T whose logits the step needs


class StepBuilder:
    def __init__(self, device: torch.device, block_size: int, max_num_tokens: int, max_num_seqs: int,
                 max_blocks_per_seq: int) -> None:
        self.device = device
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        sizes = {"input_ids": (max_num_tokens, torch.int64), "positions": (max_num_tokens, torch.int64),
                 "slot_mapping": (max_num_tokens, torch.int64), "logits_rows": (max_num_tokens, torch.int64),
                 "query_start_loc": (max_num_seqs + 1, torch.int32), "seq_lens": (max_num_seqs, torch.int32),
                 "block_tables": (max_num_seqs * max_blocks_per_seq, torch.int32)}
        self.buffers = {k: StagingBuffer(n, dtype, device) for k, (n, dtype) in sizes.items()}

    def build(self, seqs: list[StepSequence], logits_rows: list[int]) -> StepInputs:
        v, bs = {k: b.np for k, b in self.buffers.items()}, self.block_size
        num_seqs = len(seqs)
        num_tokens = sum(len(s.token_ids) for s in seqs)
        if not 0 < num_seqs <= self.max_num_seqs or num_tokens > self.max_num_tokens or any(not s.token_ids for s in seqs):
            raise ValueError(f"a step of {num_seqs} sequences and {num_tokens} tokens does not fit the step buffers "
                             f"({self.max_num_seqs} sequences, {self.max_num_tokens} tokens), or feeds a sequence nothing")
        query_lens = [len(s.token_ids) for s in seqs]
        seq_lens = [s.start + n for s, n in zip(seqs, query_lens)]
        width = max(-(-n // bs) for n in seq_lens)
        table = v["block_tables"][:num_seqs * width].reshape(num_seqs, width)
        table[:] = 0
        offset = 0
        for b, (s, n, end) in enumerate(zip(seqs, query_lens, seq_lens)):
            blocks = np.asarray(s.block_ids[:-(-end // bs)], dtype=np.int64)
            positions = np.arange(s.start, end)
            v["input_ids"][offset:offset + n] = s.token_ids
            v["positions"][offset:offset + n] = positions
            v["slot_mapping"][offset:offset + n] = blocks[positions // bs] * bs + positions % bs
            table[b, :len(blocks)] = blocks
            offset += n
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        v["query_start_loc"][:num_seqs + 1] = starts
        v["seq_lens"][:num_seqs] = seq_lens
        v["logits_rows"][:len(logits_rows)] = logits_rows
        return self._upload(num_seqs, num_tokens, width, len(logits_rows), query_lens, seq_lens, starts)

    def host_fields(self, inputs: StepInputs) -> dict[str, torch.Tensor]:
        """The host values of a built step, by name: what rank 0 sends the other ranks (runtime/step_broadcast)."""
        num_seqs, width = inputs.meta.block_tables.shape
        sizes = {"input_ids": inputs.input_ids.numel(), "positions": inputs.input_ids.numel(),
                 "slot_mapping": inputs.input_ids.numel(), "logits_rows": inputs.logits_rows.numel(),
                 "query_start_loc": num_seqs + 1, "seq_lens": num_seqs, "block_tables": num_seqs * width}
        return {name: self.buffers[name].host[:n] for name, n in sizes.items()}

    def load(self, fields: dict[str, torch.Tensor], width: int) -> StepInputs:
        """The step rank 0 built, from the host values it sent, on this rank's device."""
        for name, values in fields.items():
            self.buffers[name].np[:values.numel()] = values.numpy()
        num_seqs, num_tokens = fields["seq_lens"].numel(), fields["input_ids"].numel()
        starts, seq_lens = fields["query_start_loc"].tolist(), fields["seq_lens"].tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        return self._upload(num_seqs, num_tokens, width, fields["logits_rows"].numel(), query_lens, seq_lens, starts)

    def _upload(self, num_seqs: int, num_tokens: int, width: int, num_rows: int, query_lens: list[int],
                seq_lens: list[int], starts: list[int]) -> StepInputs:
        def upload(name: str, n: int) -> torch.Tensor:
            return self.buffers[name].upload(n)

        meta = AttentionMetadata(
            query_start_loc=upload("query_start_loc", num_seqs + 1), seq_lens=upload("seq_lens", num_seqs),
            block_tables=upload("block_tables", num_seqs * width).view(num_seqs, width),
            slot_mapping=upload("slot_mapping", num_tokens), query_lens_host=query_lens, seq_lens_host=seq_lens,
            block_size=self.block_size, query_start_loc_host=starts)
        return StepInputs(input_ids=upload("input_ids", num_tokens), positions=upload("positions", num_tokens),
                          meta=meta, logits_rows=upload("logits_rows", num_rows))
