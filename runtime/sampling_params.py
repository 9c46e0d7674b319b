"""What a request asks of the sampler and of stopping, checked once when the request is added.

Semantics follow the OpenAI API as vLLM implements it (runtime/sampler.py applies them):
- temperature 0 is greedy; top_k 0 (or -1) and top_p 1 are off; min_p keeps tokens with p >= min_p * p_max.
- repetition_penalty r (1 = off) divides positive logits and multiplies negative ones of every token seen in the
  prompt or the output; presence_penalty subtracts once from each token in the output, frequency_penalty once per
  occurrence.
- logprobs n: the sampled token's logprob plus the n most likely (0: the sampled one only); prompt_logprobs n:
  the same for every prompt token but the first. Logprobs are those of the model's distribution (log_softmax of
  the logits over the tokenizer's vocabulary), before penalties, temperature and truncation.
- None in temperature, top_p, top_k, min_p, repetition_penalty: the checkpoint's generation_config.json value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moerun.backends.errors import CheckpointError, MoerunError

MAX_LOGPROBS = 20
MAX_SEED = 2 ** 64


class RequestError(MoerunError):
    """A request the engine refuses: too long, a token id out of range, a bad sampling parameter."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    max_tokens: int | None = None  # None: up to the context limit
    min_tokens: int = 0  # stop tokens are masked out until this many tokens are generated
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text and not emitted
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (the checkpoint's EOS ids always stop, unless ignore_eos)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):  # lists (JSON) are welcome; kept as tuples, hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def with_defaults(self, defaults: GenerationDefaults) -> SamplingParams:
        """Fill every unset (None) sampling field from the checkpoint's generation defaults."""
        filled = {name: getattr(defaults, name) for name in _DEFAULTED if getattr(self, name) is None}
        return dataclasses.replace(self, **filled)

    def check(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad field and what is allowed."""
        def bad(name: str, allowed: str) -> RequestError:
            return RequestError(f"{name}: {getattr(self, name)!r} is not allowed ({allowed})")

        def number(name: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value > high or (low_open and value == low):
                raise bad(name, f"a number in {'(' if low_open else '['}{low}, {high}]")

        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                raise bad(name, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))

        number("temperature", 0.0, 1e4)
        number("top_p", 0.0, 1.0, low_open=True)
        integer("top_k", -1)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, 1e4, low_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        integer("seed", 0, MAX_SEED - 1)
        integer("max_tokens", 0)
        integer("min_tokens", 0, self.max_tokens)
        integer("logprobs", 0, MAX_LOGPROBS)
        integer("prompt_logprobs", 0, MAX_LOGPROBS)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a tuple of non-empty strings")
        for token in self.stop_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise RequestError(f"stop_token_ids: {token!r} is outside the vocabulary (allowed: 0..{vocab_size - 1})")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults a checkpoint ships in generation_config.json (neutral values where it has none)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, raw: dict[str, Any], where: str = "generation_config.json") -> GenerationDefaults:
        """The file's values, each held to the range a request's own value is (NaN, -1 or a top_p of 2 in a
        checkpoint's file is refused, not sampled with)."""
        values = {field.name: raw[field.name] for field in dataclasses.fields(cls) if raw.get(field.name) is not None}
        try:
            SamplingParams(**values).check(vocab_size=1)
        except RequestError as e:
            raise CheckpointError(f"{where}: {e}") from None
        return cls(**{name: int(v) if name == "top_k" else float(v) for name, v in values.items()})


_DEFAULTED = tuple(f.name for f in dataclasses.fields(GenerationDefaults))
