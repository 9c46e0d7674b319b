"""One request's state as it moves through the engine, and what a step reports about it."""

from __future__ import annotations

import dataclasses
import enum

from moerun.runtime.detokenizer import IncrementalDetokenizer
from moerun.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted (its blocks freed, to be recomputed)
    RUNNING = "running"  # holds KV blocks; scheduled in steps until it finishes
    FINISHED = "finished"


@dataclasses.dataclass
class LogprobEntry:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, most likely first


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # every default filled in
    max_tokens: int  # params.max_tokens, or what the context limit leaves
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and params.stop_token_ids
    seed: int  # keys the sampling noise of each output position (params.seed or drawn at add time)
    arrival_time: float
    detokenizer: IncrementalDetokenizer | None  # None without a tokenizer
    collect_logits: bool = False  # keep every prompt position's fp32 logits (Engine.logits)

    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = dataclasses.field(default_factory=list)  # prompt, then output
    num_computed_tokens: int = 0  # leading tokens whose K/V is in the cache
    block_ids: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # chained hashes of its full blocks
    num_cached_tokens: int = 0  # prefix-cache hit when first scheduled
    num_preemptions: int = 0
    output_text: str = ""
    num_text_sent: int = 0  # characters of output_text already reported
    logprobs: list[LogprobEntry] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[LogprobEntry | None] = dataclasses.field(default_factory=list)
    prompt_logits: list = dataclasses.field(default_factory=list)  # fp32 [n, V] chunks when collect_logits
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def wants_prompt_rows(self) -> bool:
        """Logits of every prompt position are needed, so no prompt position may come from the prefix cache."""
        return self.collect_logits or self.params.prompt_logprobs is not None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclasses.dataclass
class RequestOutput:
    """What one step did for one request; `output_*` are the totals so far, `new_*` this step's part."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    output_token_ids: list[int]
    output_text: str
    new_logprobs: list[LogprobEntry] | None  # None unless params.logprobs was set
    prompt_logprobs: list[LogprobEntry | None] | None  # once, in the first output, when params.prompt_logprobs
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
