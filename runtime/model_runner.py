"""Model execution, apart from scheduling: the backend, the weights, the KV cache storage, and each step's
inputs -> forward -> logits -> sampled tokens.

`execute` is three stages so that multi-device execution changes one place: `prepare` (rank 0: the scheduler's
decision as packed step inputs), `forward` (every rank: the graph over its shard), `collect` (rank 0: sampling
and logprobs). On several ranks rank 0 broadcasts the step's host values between the first two
(runtime/step_broadcast.py), and every other rank runs `serve_steps`: the same step, rebuilt from them, forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from moerun.runtime import step_broadcast
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.kv_cache import allocate_kv_caches
from moerun.runtime.launch import place
from moerun.runtime.limits import check_kv_blocks, check_memory, check_weights, kv_blocks_that_fit, max_model_len
from moerun.runtime.loader import WeightLoader
from moerun.runtime.memory import memory_free
from moerun.runtime.model import MiniMaxM2Model
from moerun.runtime.model_config import ModelConfig
from moerun.runtime.request import LogprobEntry, Request
from moerun.runtime.run_config import RunConfig
from moerun.runtime.sampler import Sampler, logprob_entries
from moerun.runtime.scheduler import ScheduledRequest
from moerun.runtime.step_builder import StepBuilder, StepInputs, StepSequence

Observe = Callable[[str, torch.Tensor], None]


@dataclasses.dataclass
class StepResult:
    """What one step produced for one scheduled request."""

    token_id: int | None = None  # sampled when the step computed all of its tokens and it wants more
    logprobs: LogprobEntry | None = None
    prompt_logprobs: list[LogprobEntry] = dataclasses.field(default_factory=list)  # entries of this chunk
    prompt_logits: torch.Tensor | None = None  # fp32 [n, V] on the host, when the request collects them


@dataclasses.dataclass
class _RowPlan:
    """Which rows of the step's logits belong to whom."""

    rows: list[int] = dataclasses.field(default_factory=list)  # packed-token rows whose logits are computed
    sample: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (scheduled index, logits row)
    prompt: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)  # (index, first row, count, first position)


class ModelRunner:
    def __init__(self, run: RunConfig, folder: Path, config: ModelConfig, num_layers: int, block_size: int,
                 sample_vocab_size: int, progress: Callable[[int, int], None] | None = None) -> None:
        self.config = cfg = config
        placement = place(run, cfg, num_layers, block_size)
        self.backend = backend = placement.backend
        self.plan = plan = placement.plan
        self.comm = placement.comm
        self.block_size = block_size
        loader = WeightLoader(Checkpoint(folder), cfg, backend, plan)
        weights = loader.weight_bytes(num_layers)  # this rank's share
        free = memory_free(backend)  # one reading, before loading: the cache is sized from it and checked against it
        check_weights(backend, plan, num_layers, weights, free)
        self.num_blocks = run.kv_num_blocks or self._blocks_that_fit(run, num_layers, weights, free)
        check_memory(run, backend, cfg, plan, num_layers, self.num_blocks, block_size, weights, free)
        # A scheduler.max_model_len the cache cannot hold is refused here, before loading.
        self.max_model_len = max_model_len(run, cfg.max_position_embeddings, self.num_blocks * block_size)
        self.model = MiniMaxM2Model(cfg, loader.load(num_layers, progress), backend, self.comm, plan)
        self.bytes_read = loader.bytes_read  # of the checkpoint, by this rank
        self.kv_caches = allocate_kv_caches(backend, num_layers, self.num_blocks, block_size,
                                            len(plan.local_kv_heads(cfg.num_kv_heads)), cfg.head_dim)
        sched = run.scheduler
        max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.builder = StepBuilder(backend.device, block_size, sched.max_num_batched_tokens, sched.max_num_seqs,
                                   max_blocks_per_seq)
        # Decode steps may be replayed as device graphs (on one rank: collectives inside a captured graph are not
        # built yet); other steps run the graph eagerly.
        self._decode_forward = self.model.forward if self.comm.world.size > 1 else backend.decode_runner(
            self.model.forward, max_num_seqs=sched.max_num_seqs, max_blocks_per_seq=max_blocks_per_seq)
        self.sample_vocab_size = sample_vocab_size
        self.sampler = Sampler(sample_vocab_size, backend.device, sched.max_num_seqs)

    def _blocks_that_fit(self, run: RunConfig, num_layers: int, weights: int, free: int | None) -> int:
        """kv_cache.num_blocks unset: limits.kv_blocks_that_fit on each rank, the smallest taken (the ranks must all
        hold the same blocks), refused below one block on every rank alike."""
        mine = kv_blocks_that_fit(run, self.config, self.plan, self.backend, num_layers, self.block_size, weights, free)
        blocks = int(self.comm.host.all_gather(torch.tensor([mine])).min())
        check_kv_blocks(run, self.backend, blocks, weights, free)
        return blocks

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest], observe: Observe | None = None) -> list[StepResult]:
        inputs, plan = self.prepare(scheduled)
        if self.comm.world.size > 1:
            step_broadcast.send(self.comm.host, step_broadcast.StepMessage(
                step_broadcast.STEP, self.builder.host_fields(inputs), inputs.meta.block_tables.shape[1]))
        logits = self.forward(inputs, observe)
        return self.collect(scheduled, plan, logits)

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """Every rank but 0: run each step rank 0 sends, until it says stop."""
        while True:
            message = step_broadcast.receive(self.comm.host)
            if message.kind == step_broadcast.STOP:
                return
            if message.kind == step_broadcast.STEP:
                self.forward(self.builder.load(message.fields, message.block_table_width))

    def keepalive(self) -> None:
        """Rank 0, idle: reassure the other ranks, whose wait for the next step is bounded by the timeout."""
        if self.comm.world.size > 1:
            step_broadcast.send(self.comm.host, step_broadcast.StepMessage(step_broadcast.KEEPALIVE))

    def close(self) -> None:
        """Rank 0 tells the other ranks the run is over; every rank leaves the world it joined."""
        if self.comm.world.size > 1:
            if self.comm.is_first:
                step_broadcast.send(self.comm.host, step_broadcast.StepMessage(step_broadcast.STOP))
            self.comm.close()

    def prepare(self, scheduled: list[ScheduledRequest]) -> tuple[StepInputs, _RowPlan]:
        plan = _RowPlan()
        seqs, offset = [], 0
        for index, s in enumerate(scheduled):
            r = s.request
            seqs.append(StepSequence(r.token_ids[s.start:s.start + s.num_tokens], s.start, r.block_ids))
            first, end = _prompt_rows_needed(r, s)
            if end > first:
                plan.prompt.append((index, len(plan.rows), end - first, first))
                plan.rows.extend(range(offset + first - s.start, offset + end - s.start))
            if s.completes and r.num_output_tokens < r.max_tokens:
                plan.sample.append((index, len(plan.rows)))
                plan.rows.append(offset + s.num_tokens - 1)
            offset += s.num_tokens
        return self.builder.build(seqs, plan.rows), plan

    def forward(self, inputs: StepInputs, observe: Observe | None = None) -> torch.Tensor:
        """The graph over the step's tokens; fp32 logits [N, V] of inputs.logits_rows."""
        run = self._decode_forward if inputs.meta.is_decode and observe is None else self.model.forward
        hidden = run(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches, observe)
        return self.model.compute_logits(hidden[inputs.logits_rows])

    def collect(self, scheduled: list[ScheduledRequest], plan: _RowPlan, logits: torch.Tensor) -> list[StepResult]:
        results = [StepResult() for _ in scheduled]
        if plan.sample:
            rows = [row for _, row in plan.sample]
            out = self.sampler(logits[rows], [scheduled[i].request for i, _ in plan.sample])
            for (i, _), token, entry in zip(plan.sample, out.token_ids, out.logprobs):
                results[i].token_id, results[i].logprobs = token, entry
        for i, row, count, position in plan.prompt:
            request = scheduled[i].request
            chunk = logits[row:row + count]
            if request.collect_logits:
                results[i].prompt_logits = chunk.cpu()
            else:
                targets = torch.tensor(request.token_ids[position + 1:position + 1 + count], device=chunk.device)
                results[i].prompt_logprobs = logprob_entries(chunk[:, :self.sample_vocab_size], targets,
                                                             [request.params.prompt_logprobs] * count)
        return results


def _prompt_rows_needed(request: Request, s: ScheduledRequest) -> tuple[int, int]:
    """Positions [first, end) of this step whose logits the request's prompt logprobs (or logits) still lack.
    The logits at position p score the prompt token at p + 1; collected logits cover every prompt position."""
    if request.collect_logits:
        done = sum(chunk.shape[0] for chunk in request.prompt_logits)
        limit = request.num_prompt_tokens
    elif request.params.prompt_logprobs is not None:
        done = len(request.prompt_logprobs) - 1  # entry 0 (the first prompt token) has no logprob
        limit = request.num_prompt_tokens - 1
    else:
        return 0, 0
    first = max(s.start, done)
    return first, max(first, min(s.start + s.num_tokens, limit))
