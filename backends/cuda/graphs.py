"""Decode steps as CUDA graphs: the whole forward of a decode step captured once per batch-size bucket and
replayed with this step's inputs copied into the captured buffers. At batch 1 a step is ~20 launches per layer;
replay removes the host's launch cost, which otherwise dominates.

A graph is keyed by a batch-size bucket and a length bucket, and captured on its first use (not all at
start-up). A batch of n sequences replays the smallest batch bucket >= n; its padded rows have slot -1 (the KV
write skips them) and length 0 (attention returns 0 for them), and their outputs are dropped. The host may not
read the device inside a graph, so the decode attention sizes its KV partitions by the captured block-table
width; the length bucket (the longest sequence rounded up to a power of two, at least MIN_LEN_BUCKET tokens)
keeps that width within 2x of the real lengths, so short contexts are not spread over a 200k-token capacity.
Prefill and mixed steps, batches above the largest bucket, block tables wider than max_blocks_per_seq, and
steps with an `observe` hook (parity --per-layer) run eagerly.

Unverified without a GPU: this was written in a session that had none, so capture and replay have not run;
tests/cuda/test_gpu_model.py checks them against eager decode where a GPU is visible; the data path
(padding, length buckets, graph-mode ops) is also tested on the CPU by tests/test_cuda_kernels_interpreted.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moerun.backends.base import AttentionMetadata

Forward = Callable[..., torch.Tensor]  # forward(input_ids, positions, meta, kv_caches, observe=None) -> hidden


MIN_LEN_BUCKET = 1024


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (and max_batch itself)."""
    small = [b for b in (1, 2, 4, 8) if b <= max_batch]
    return sorted(set(small) | set(range(16, max_batch + 1, 16)) | {max_batch})


class DecodeGraphs:
    def __init__(self, backend, forward: Forward, max_batch: int, max_blocks_per_seq: int) -> None:
        self.backend = backend  # a CudaBackend: its graph_mode() makes the ops capture-safe
        self.forward = forward
        self.device = device = backend.device
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks_per_seq
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.kv_caches: list[Any] | None = None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[Any], observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        n = meta.num_seqs
        if (observe is not None or not meta.is_decode or n > self.buckets[-1]
                or meta.block_tables.shape[1] > self.max_blocks):
            return self.forward(input_ids, positions, meta, kv_caches, observe)
        if kv_caches is not self.kv_caches:  # graphs hold the cache pointers they were captured with
            self.graphs.clear()
            self.kv_caches = kv_caches
        bucket = self.bucket_for(n)
        width = self.table_width_for(meta.max_seq_len, meta.block_size)
        self.load(input_ids, positions, meta, n, bucket)
        if (bucket, width) not in self.graphs:
            self._capture(bucket, width, meta.block_size, kv_caches)
        graph, out = self.graphs[bucket, width]
        graph.replay()
        return out[:n]  # a view of the graph's output buffer: valid until the next replay

    def load(self, input_ids, positions, meta: AttentionMetadata, n: int, bucket: int) -> None:
        """Copy a step of n sequences into the bucket's buffers; rows n..bucket-1 become inert padding."""
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if bucket > n:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.seq_lens[n:bucket].zero_()
            self.slot_mapping[n:bucket].fill_(-1)

    def static_inputs(self, bucket: int, width: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The captured buffers of a bucket as forward's inputs (what a graph replays); the block tables are viewed
        `width` blocks wide, which bounds every sequence's length for the attention kernels."""
        capacity = width * block_size
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[:bucket + 1], seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket, :width], slot_mapping=self.slot_mapping[:bucket],
            query_lens_host=[1] * bucket, seq_lens_host=[capacity] * bucket, block_size=block_size)
        return self.input_ids[:bucket], self.positions[:bucket], meta

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def table_width_for(self, max_seq_len: int, block_size: int) -> int:
        """Blocks per sequence of the length bucket of max_seq_len."""
        tokens = max(MIN_LEN_BUCKET, 1 << (max(max_seq_len, 1) - 1).bit_length())
        return min(self.max_blocks, -(-tokens // block_size))

    def _capture(self, bucket: int, width: int, block_size: int, kv_caches: list[Any]) -> None:
        args = (*self.static_inputs(bucket, width, block_size), kv_caches)
        # One eager run first, on a side stream: compiles the Triton kernels and settles the allocator. It runs
        # this step's real inputs, so the KV it writes is exactly what the replay below writes again.
        with self.backend.graph_mode():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.forward(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(*args)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[bucket, width] = (graph, out)
