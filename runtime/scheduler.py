"""Continuous batching: which requests run in the next step, and how many of their tokens.

There is no prefill or decode phase. A request has tokens (prompt, then output) and a count of them whose K/V
is computed; each step lets the computed count catch up, at most max_num_batched_tokens tokens in all. So one
packed step mixes decode tokens of running requests with chunks of prompts, and a long prompt is prefilled in
chunks across steps. Order is first come, first served: running requests first (in arrival order), then
waiting ones while the token budget, max_num_seqs and the free blocks allow.

Everything is decided before the step runs: a request is scheduled only once its blocks are allocated. When a
running request needs a block and none is free, the most recently arrived running request is preempted by
recompute: its blocks are freed and it goes back to the front of the queue keeping its output tokens, to be
prefilled again (prompt + output) later. Its sampling depends only on its own tokens, seed and position, so
its output does not change.
"""

from __future__ import annotations

import collections
import dataclasses

from moerun.runtime.block_manager import BlockManager
from moerun.runtime.request import Request, RequestStatus
from moerun.runtime.run_config import SchedulerConfig


@dataclasses.dataclass
class ScheduledRequest:
    request: Request
    start: int  # tokens already computed: this step computes token_ids[start:start + num_tokens]
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every known token is computed: the next token can be sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request, request.num_computed_tokens + num):
                victim = self.running.pop()  # the latest arrival; never one scheduled already (they come first)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num))
                budget -= num
                i += 1
                continue
            break

        # Newcomers only when nobody had to give way: they would take the blocks the preempted need back.
        while not preempted and self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            cached = self.blocks.find_cached_prefix(request)
            start = len(cached[0]) * self.blocks.block_size
            num = min(request.num_tokens - start, budget)
            if not self.blocks.allocate(request, start + num, cached):
                break
            self.blocks.record_prefix_lookup(request.num_tokens, start)
            if request.num_preemptions == 0:
                request.num_cached_tokens = start
            request.num_computed_tokens = start
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, start, num))
            budget -= num
        return SchedulerOutput(scheduled, preempted)

    def update(self, output: SchedulerOutput) -> None:
        """After the step ran: its tokens are computed; newly full blocks join the prefix cache."""
        for s in output.scheduled:
            s.request.num_computed_tokens = s.start + s.num_tokens
            self.blocks.cache_full_blocks(s.request)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (stop, length or abort) and free its blocks at once."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
