"""/v1/completions: a text or token-id prompt, no template; with `echo` the prompt comes back in front of the
completion, with `echo` and `logprobs` each prompt token's logprob too (what fidelity checks read: the model's
teacher-forced distribution at every position)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moerun.runtime.serve import responses
from moerun.runtime.serve.errors import OpenAIError
from moerun.runtime.serve.generation import Generation, ServeState, usage_of
from moerun.runtime.serve.protocol import CompletionRequest
from moerun.runtime.serve.responses import TokenLogprob
from moerun.runtime.serve.sampling_params import sampling_kwargs


class Completion:
    def __init__(self, state: ServeState, body: CompletionRequest):
        self.state = state
        self.body = body
        self.arrival = time.monotonic()
        tokenizer = state.tokenizer
        if isinstance(body.prompt, str):
            self.prompt_ids = tokenizer.encode(body.prompt)
            self.prompt_text = body.prompt
        else:
            self.prompt_ids = list(body.prompt)  # the engine checks the ids against the vocabulary
            self.prompt_text = None  # decoded only when echoed, once the engine has accepted the ids
        self.sampling = sampling_kwargs(body, len(self.prompt_ids), state.max_model_len, state.defaults)
        self.request_id = responses.completion_id()
        self._offset = 0  # characters of the choice's text sent so far (logprobs' text_offset)

    async def start(self) -> Generation:
        return await self.state.start("completions", self.request_id, self.prompt_ids, self.sampling, self.arrival)

    def _echo_text(self) -> str:
        if self.prompt_text is None:
            self.prompt_text = self.state.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
        return self.prompt_text

    def _prompt_entries(self, first: Any) -> list[TokenLogprob]:
        """The echoed prompt's logprobs: the first token's is None (nothing predicts it)."""
        texts, as_ids = self.state.token_texts, self.body.return_tokens_as_token_ids
        return [texts.entry(token, None, as_ids=as_ids) if entry is None
                else texts.entry(entry.token_id, entry.logprob, entry.top, as_ids)
                for token, entry in zip(self.prompt_ids, first.prompt_logprobs or [None] * len(self.prompt_ids))]

    def _piece(self, outputs: Sequence[Any], first: bool) -> tuple[str, dict[str, Any] | None]:
        """This part of the choice's text and its logprobs (the echoed prompt in front of the first part)."""
        text = "".join(o.new_text for o in outputs)
        entries: list[TokenLogprob] = []
        if first and self.body.echo:
            text = self._echo_text() + text
            if self.body.logprobs is not None:
                entries = self._prompt_entries(outputs[0])
        if self.body.logprobs is None:
            return text, None
        entries += self.state.token_texts.entries([e for o in outputs for e in (o.new_logprobs or ())],
                                                  self.body.return_tokens_as_token_ids)
        logprobs = responses.completion_logprobs(entries, self._offset)
        self._offset += len(text)
        return text, logprobs

    async def respond(self, generation: Generation) -> dict[str, Any]:
        pieces, last = [], None
        async for outputs in generation.outputs():
            pieces.append(self._piece(outputs, first=last is None))
            last = outputs[-1]
        generation.finish_reason = last.finish_reason
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = {key: [v for _, lp in pieces for v in lp[key]] for key in pieces[0][1]}
        return responses.completion(self.request_id, self.state.model_name, "".join(t for t, _ in pieces),
                                    last.finish_reason, usage_of(last), logprobs)

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        chunks = responses.CompletionChunks(self.state.model_name, self.body.include_usage, self.request_id)
        try:
            last = None
            async for outputs in generation.outputs():
                text, logprobs = self._piece(outputs, first=last is None)
                last = outputs[-1]
                if last.finished:
                    generation.finish_reason = last.finish_reason
                    yield responses.sse_event(chunks.finish(last.finish_reason, text, logprobs))
                elif text or logprobs:
                    yield responses.sse_event(chunks.text(text, logprobs))
            if self.body.include_usage:
                yield responses.sse_event(chunks.usage(usage_of(last)))
        except OpenAIError as error:
            yield responses.sse_event(error.body())
        yield responses.SSE_DONE

