"""The one place an OpenAI request becomes the engine's sampling parameters.

`sampling_kwargs` returns keyword arguments for the engine's SamplingParams (ENGINE_FIELDS are its field names),
so adapting to the engine is a change here and nowhere else. Fields the request leaves out take the checkpoint's
generation_config.json defaults (`defaults`), then OpenAI's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moerun.runtime.serve.errors import bad_request, context_length_exceeded
from moerun.runtime.serve.protocol import ChatCompletionRequest, CompletionRequest

ENGINE_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                 "logprobs", "prompt_logprobs")

# OpenAI's defaults where neither the request nor the checkpoint says; top_k 0 = no cut.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's legacy API and vLLM
SEED_MODULUS = 2**64  # OpenAI's seed is a signed int64, the engine's an unsigned 64-bit integer


def sampling_kwargs(request: ChatCompletionRequest | CompletionRequest, prompt_tokens: int, max_model_len: int,
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams(**sampling_kwargs(...)) for this request, whose prompt is `prompt_tokens` long.
    Raises OpenAIError (400) when the prompt and the requested tokens do not fit `max_model_len`."""
    chat = isinstance(request, ChatCompletionRequest)
    kwargs = {}
    for name, fallback in OPENAI_DEFAULTS.items():
        value = getattr(request, name)
        kwargs[name] = value if value is not None else (defaults or {}).get(name, fallback)
    kwargs["top_k"] = max(0, kwargs["top_k"])  # vLLM's -1 means no cut, as 0 does here
    kwargs["max_tokens"] = _max_tokens(request, prompt_tokens, max_model_len, "messages" if chat else "prompt")
    if request.min_tokens > kwargs["max_tokens"]:
        raise bad_request(f"min_tokens ({request.min_tokens}) is larger than max_tokens ({kwargs['max_tokens']})",
                          param="min_tokens")
    if chat:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt_logprobs = None
    else:
        logprobs = request.logprobs
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
    seed = None if request.seed is None else request.seed % SEED_MODULUS  # the same bits, read as unsigned
    kwargs.update(seed=seed, stop=list(request.stop or []), stop_token_ids=list(request.stop_token_ids or []),
                  ignore_eos=request.ignore_eos, min_tokens=request.min_tokens, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
    return kwargs


def _max_tokens(request: ChatCompletionRequest | CompletionRequest, prompt_tokens: int, max_model_len: int,
                param: str) -> int:
    """An explicit max_tokens must fit beside the prompt; without one a completion gets 16 tokens and a chat the
    rest of the context, cut to what fits."""
    room = max_model_len - prompt_tokens
    asked = request.requested_max_tokens
    if (asked is not None and asked > room) or room < 1:
        raise context_length_exceeded(max_model_len, prompt_tokens, asked or 1, param=param)
    if asked is not None:
        return asked
    return room if isinstance(request, ChatCompletionRequest) else min(room, COMPLETIONS_DEFAULT_MAX_TOKENS)
