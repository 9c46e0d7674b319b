"""The engine: requests in, tokens out, one scheduled step at a time.

It wires one RunConfig into the pieces (each in its own file): the model runner (backend, weights, KV storage,
forward, sampling), the block manager (which KV blocks each request holds, prefix caching), the scheduler
(continuous batching) and, per request, stopping and incremental detokenization. Every entry point (CLI, server,
tests, parity) goes through here. Not thread-safe: one thread drives add_request / abort_request / step.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moerun.backends.base import get_backend_class
from moerun.backends.errors import CheckpointError
from moerun.runtime.block_manager import BlockManager
from moerun.runtime.detokenizer import IncrementalDetokenizer
from moerun.runtime.limits import max_model_len
from moerun.runtime.model_config import load_model_config
from moerun.runtime.model_runner import ModelRunner, Observe
from moerun.runtime.request import Request, RequestOutput
from moerun.runtime.run_config import BUILTIN_DEMO, BUILTIN_RANDOM_DEMO, RunConfig, load_run_config
from moerun.runtime.sampling_params import GenerationDefaults, RequestError, SamplingParams
from moerun.runtime.scheduler import Scheduler
from moerun.runtime.stopping import append_token, text_to_report
from moerun.runtime.tokenizer import Tokenizer, read_optional_json


def resolve_model_folder(model_path: str) -> Path:
    if model_path == BUILTIN_DEMO:
        from moerun.runtime.trained_demo import trained_demo_folder

        return trained_demo_folder()
    if model_path == BUILTIN_RANDOM_DEMO:
        from moerun.runtime.demo import ensure_demo_checkpoint

        return ensure_demo_checkpoint()
    return Path(model_path)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int


class Engine:
    def __init__(self, run: RunConfig, num_layers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.run = run
        self.folder = resolve_model_folder(run.model_path)
        self.config = cfg = load_model_config(self.folder)
        self._tokenizer = Tokenizer.from_folder(self.folder) if (self.folder / "tokenizer.json").is_file() else None
        generation_config = read_optional_json(self.folder / "generation_config.json")
        self.generation_defaults = GenerationDefaults.from_generation_config(
            generation_config, str(self.folder / "generation_config.json"))
        self.eos_token_ids = self._tokenizer.eos_token_ids if self._tokenizer else _eos_ids(generation_config, cfg.eos_token_ids)
        block_size = run.kv_block_size or get_backend_class(run.backend).capabilities.kv_block_sizes[0]
        self.max_model_len = max_model_len(run, cfg.max_position_embeddings, run.kv_num_blocks * block_size)
        # The tokenizer's vocabulary: a checkpoint's vocab_size may be padded past it, and those ids never sampled.
        sample_vocab = min(cfg.vocab_size, self._tokenizer.vocab_size) if self._tokenizer else cfg.vocab_size
        self.runner = ModelRunner(run, self.folder, cfg, num_layers or run.num_layers or cfg.num_layers, block_size,
                                  self.max_model_len, sample_vocab, progress)
        self.block_manager = BlockManager(run.kv_num_blocks, block_size, run.scheduler.enable_prefix_caching)
        self.scheduler = Scheduler(run.scheduler, self.block_manager)
        self._requests: dict[str, Request] = {}
        self._seeds = random.Random()  # seeds of requests that bring none
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: str | Path | RunConfig, num_layers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Engine:
        run = config if isinstance(config, RunConfig) else load_run_config(config)
        return cls(run, num_layers=num_layers, progress=progress)

    # ---- what the engine runs on ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise CheckpointError(f"{self.folder}: no tokenizer.json (moerun needs the Hugging Face fast-tokenizer file)")
        return self._tokenizer

    @property
    def backend(self):
        return self.runner.backend

    @property
    def model(self):
        return self.runner.model

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    @property
    def sample_vocab_size(self) -> int:
        """Ids below it can be sampled and have logprobs (the tokenizer's vocabulary within the model's)."""
        return self.runner.sample_vocab_size

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. RequestError (one line) for anything the engine could never serve."""
        self._queue(self._new_request(request_id, prompt_token_ids, params))

    def abort_request(self, request_id: str) -> None:
        """End a request now and free its blocks; unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is not None and not request.finished:
            self.scheduler.finish(request, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; an output for every request that progressed (a token, or its end)."""
        return self._step(None)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_blocks,
                           prefix_cache_queries=bm.prefix_stats.queries, prefix_cache_hits=bm.prefix_stats.hits,
                           num_preemptions=self.scheduler.num_preemptions)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, e.g. to time or compare runs from a cold cache."""
        self.block_manager.reset_prefix_cache()

    # ---- conveniences on top ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Serve every prompt (continuously batched) to the end; each one's final output, in prompt order. Runs
        alone: the outputs of other requests in flight would be lost."""
        if self.has_unfinished_requests():
            raise RuntimeError("Engine.generate runs alone; requests are in flight")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        batch = next(self._ids)
        ids = [f"generate-{batch}-{i}" for i in range(len(prompts))]
        requests = [self._new_request(rid, p, sp) for rid, p, sp in zip(ids, prompts, params_list)]
        for request in requests:
            self._queue(request)
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                self.abort_request(rid)
        return [final[rid] for rid in ids]

    def logits(self, token_ids: list[int], observe: Observe | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits at every position, fp32 [T, V] on the CPU, through the prefill path
        (in chunks of max_num_batched_tokens). `observe` sees the graph's stages (runs alone: no other requests)."""
        if self.has_unfinished_requests():
            raise RuntimeError("Engine.logits runs alone; requests are in flight")
        request = self._new_request(f"logits-{next(self._ids)}", token_ids, SamplingParams(max_tokens=0),
                                    collect_logits=True)
        self._queue(request)
        try:
            while not request.finished:
                self._step(observe)
        finally:
            self.abort_request(request.request_id)
        return torch.cat(request.prompt_logits)

    # ---- internals -------------------------------------------------------------------------------------------------
    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                     collect_logits: bool = False) -> Request:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        vocab = self.config.vocab_size
        if not prompt:
            raise RequestError("the prompt has no tokens")
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise RequestError(f"token id {t!r} at position {i} is outside the vocabulary (allowed: 0..{vocab - 1})")
        params.check(vocab)
        if params.stop and self._tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this checkpoint has no tokenizer.json")
        params = params.with_defaults(self.generation_defaults)
        num_prompt = len(prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else max(self.max_model_len - num_prompt, 1)
        if num_prompt + max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the completion). "
                f"Please reduce the length of the messages or completion.")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        detokenizer = (IncrementalDetokenizer(self._tokenizer, prompt, params.skip_special_tokens)
                       if self._tokenizer is not None else None)
        request = Request(request_id=request_id, prompt_token_ids=list(prompt), params=params, max_tokens=max_tokens,
                          stop_token_ids=frozenset(stop_ids),
                          seed=params.seed if params.seed is not None else self._seeds.getrandbits(64),
                          arrival_time=time.monotonic(), detokenizer=detokenizer, collect_logits=collect_logits)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs.append(None)  # the first prompt token has no logprob
        return request

    def _queue(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def _step(self, observe: Observe | None) -> list[RequestOutput]:
        decision = self.scheduler.schedule()
        if not decision.scheduled:
            return []
        results = self.runner.execute(decision.scheduled, observe)
        self.scheduler.update(decision)
        outputs = []
        for s, result in zip(decision.scheduled, results):
            request = s.request
            if result.prompt_logits is not None:
                request.prompt_logits.append(result.prompt_logits)
            request.prompt_logprobs.extend(result.prompt_logprobs)
            new_tokens, reason = [], None
            if result.token_id is not None:
                new_tokens = [result.token_id]
                if result.logprobs is not None:
                    request.logprobs.append(result.logprobs)
                reason = append_token(request, result.token_id)
            elif s.completes and request.max_tokens == 0:
                reason = "length"  # a prompt-only request (prompt logprobs, teacher-forced logits)
            if reason is not None:
                self.scheduler.finish(request, reason)
            if new_tokens or reason is not None:
                # a request's first output comes with its first token (or its end, if it asked for none)
                outputs.append(self._output(request, new_tokens, first=request.num_output_tokens <= 1))
            if request.finished:
                self._requests.pop(request.request_id, None)
        return outputs

    def _output(self, request: Request, new_tokens: list[int], first: bool) -> RequestOutput:
        params = request.params
        new_logprobs = None
        if params.logprobs is not None:
            new_logprobs = request.logprobs[len(request.logprobs) - len(new_tokens):]
        return RequestOutput(
            request_id=request.request_id, new_token_ids=new_tokens, new_text=text_to_report(request),
            output_token_ids=request.output_token_ids, output_text=request.output_text, new_logprobs=new_logprobs,
            prompt_logprobs=list(request.prompt_logprobs) if params.prompt_logprobs is not None and first else None,
            finished=request.finished, finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens)


def _eos_ids(generation_config: dict, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """Without a tokenizer: generation_config.json's eos_token_id (int or list), then config.json's."""
    value = generation_config.get("eos_token_id")
    listed = value if isinstance(value, list) else [value]
    ids = [t for t in listed if isinstance(t, int) and not isinstance(t, bool)]
    return tuple(dict.fromkeys([*ids, *config_eos]))
