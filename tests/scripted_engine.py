"""An engine stand-in for server tests: the Engine interface (add_request, abort_request, step, stats, ...) with the
model replaced by a script. Each request's output is the text `script(prompt_text)` returns, tokenized by the
real tokenizer and emitted one token per step (then "stop", as if the model wrote EOS), so the whole server path
runs (detokenized pieces, parsers, chunks) on known output. KV blocks are counted as the real engine counts them
(prompt + output tokens held, in blocks), so tests can check that aborts free them.

Knobs: `step_delay_s` (a step takes this long), `fail_at_step` (the step that raises, killing the engine loop).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from moerun.runtime.sampling_params import GenerationDefaults, RequestError, SamplingParams

SCRIPTED_LOGPROB = -0.25  # the logprob every scripted token gets; its top alternatives are lower


@dataclasses.dataclass
class Entry:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Output:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    output_token_ids: list[int]
    output_text: str
    new_logprobs: list[Entry] | None
    prompt_logprobs: list[Entry | None] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    script: list[int]
    output: list[int] = dataclasses.field(default_factory=list)
    text_sent: int = 0


@dataclasses.dataclass(frozen=True)
class Stats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class ScriptedEngine:
    def __init__(self, tokenizer, script: Callable[[str], str], max_model_len: int = 4096, num_blocks: int = 512,
                 block_size: int = 16, step_delay_s: float = 0.0, fail_at_step: int | None = None):
        self.tokenizer = tokenizer
        self.script = script
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_delay_s = step_delay_s
        self.fail_at_step = fail_at_step
        self.generation_defaults = GenerationDefaults()
        self.vocab_size = tokenizer.vocab_size
        self.steps = 0
        self.prompt_tokens_seen = 0
        self._running: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        for i, t in enumerate(prompt_token_ids):
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"token id {t} at position {i} is outside the vocabulary "
                                   f"(allowed: 0..{self.vocab_size - 1})")
        params.check(self.vocab_size)
        script = self.tokenizer.encode(self.script(self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)))
        self._running[request_id] = _Request(request_id, list(prompt_token_ids), params, script)

    def abort_request(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running)

    def stats(self) -> Stats:
        used = sum(-(-(len(r.prompt) + len(r.output)) // self.block_size) for r in self._running.values())
        return Stats(len(self._running), 0, used, self.num_blocks, 0, 0, 0)

    def step(self) -> list[Output]:
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("scripted failure")
        time.sleep(self.step_delay_s)
        outputs = []
        for request in list(self._running.values()):
            outputs.append(self._advance(request))
            if outputs[-1].finished:
                del self._running[request.request_id]
        return outputs

    def _advance(self, r: _Request) -> Output:
        params = r.params
        first = not r.output
        done = len(r.output) >= len(r.script)
        new = [] if done else [r.script[len(r.output)]]
        r.output += new
        length = params.max_tokens is not None and len(r.output) >= params.max_tokens
        finished = done or length
        text = self.tokenizer.decode(r.output)
        if not finished and text.endswith("\ufffd"):  # hold back an incomplete character, as the engine does
            new_text = ""
        else:
            new_text, r.text_sent = text[r.text_sent:], len(text)
        entries = None if params.logprobs is None else [self._entry(t, params.logprobs) for t in new]
        prompt_entries = None
        if first and params.prompt_logprobs is not None:
            prompt_entries = [None] + [self._entry(t, params.prompt_logprobs) for t in r.prompt[1:]]
        return Output(r.request_id, new, new_text, list(r.output), text[:r.text_sent], entries, prompt_entries,
                      finished, ("length" if length and not done else "stop") if finished else None, None,
                      len(r.prompt), 0)

    def _entry(self, token: int, top: int) -> Entry:
        alternatives = [(token, SCRIPTED_LOGPROB)] + [((token + k) % self.vocab_size, SCRIPTED_LOGPROB - k)
                                                       for k in range(1, top)]
        return Entry(token, SCRIPTED_LOGPROB, alternatives[:top])
