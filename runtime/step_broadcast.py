"""Rank 0's decision for one step, sent to every other rank: tensors, never pickled objects.

A step is two broadcasts over the host (gloo) group: a fixed header of int64 [kind, block-table width, then the
length of each field], then one int64 payload holding the fields end to end. The fields are what the graph needs
to run the same step on every rank (the packed token ids and positions, the cache slots, which rows' logits, the
query starts and KV lengths, the block tables); the scheduler, the requests and the sampler stay on rank 0.
Besides STEP, rank 0 sends STOP (the command is done: the workers return) and KEEPALIVE (an idle server, so the
workers' wait never reaches the process-group timeout)."""

from __future__ import annotations

import dataclasses

import torch

from moerun.runtime.communicator import Group

STEP, STOP, KEEPALIVE = 1, 2, 3
FIELDS = ("input_ids", "positions", "slot_mapping", "logits_rows", "query_start_loc", "seq_lens", "block_tables")
_HEADER = 2 + len(FIELDS)


@dataclasses.dataclass
class StepMessage:
    kind: int
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # int64 1-D host tensors
    block_table_width: int = 0


def send(group: Group, message: StepMessage) -> None:
    """On rank 0 (group rank 0)."""
    fields = [message.fields[name].reshape(-1).to("cpu", torch.int64) for name in FIELDS] if message.fields else []
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0], header[1] = message.kind, message.block_table_width
    for i, field in enumerate(fields):
        header[2 + i] = field.numel()
    group.broadcast(header)
    if message.kind == STEP:
        group.broadcast(torch.cat(fields))


def receive(group: Group) -> StepMessage:
    """On every other rank: blocks until rank 0 sends."""
    header = group.broadcast(torch.zeros(_HEADER, dtype=torch.int64))
    kind, width, *lengths = header.tolist()
    if kind != STEP:
        return StepMessage(kind)
    payload = group.broadcast(torch.empty(sum(lengths), dtype=torch.int64))
    return StepMessage(kind, dict(zip(FIELDS, payload.split(lengths))), width)
