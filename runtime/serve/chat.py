"""/v1/chat/completions: messages -> the chat template's prompt -> the engine -> M2's output parsed into reasoning,
content and tool calls, streamed as chunks or returned as one message."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moerun.backends.errors import MoerunError
from moerun.runtime.parsers import ChatOutputParser, ParsedMessage
from moerun.runtime.serve import responses
from moerun.runtime.serve.errors import OpenAIError, bad_request
from moerun.runtime.serve.generation import Generation, ServeState, usage_of
from moerun.runtime.serve.protocol import ChatCompletionRequest
from moerun.runtime.serve.sampling_params import sampling_kwargs


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  add_generation_prompt: bool, template_kwargs: dict[str, Any]) -> str:
    """The checkpoint's chat template applied; a template that rejects the messages is the request's fault."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except MoerunError as e:
        raise bad_request(str(e), param="messages") from None


class ChatCompletion:
    """One chat request, from the parsed body to the engine request and its parser."""

    def __init__(self, state: ServeState, body: ChatCompletionRequest):
        self.state = state
        self.body = body
        self.arrival = time.monotonic()
        self.prompt = render_prompt(state.tokenizer, body.template_messages(), body.offered_tools(), True,
                                    body.template_kwargs())
        self.prompt_ids = state.tokenizer.encode(self.prompt)
        self.sampling = sampling_kwargs(body, len(self.prompt_ids), state.max_model_len, state.defaults)
        self.parser: ChatOutputParser = body.output_parser(self.prompt, state.reasoning)
        self.request_id = responses.chat_completion_id()

    async def start(self) -> Generation:
        return await self.state.start("chat", self.request_id, self.prompt_ids, self.sampling, self.arrival)

    def _logprobs(self, outputs: Sequence[Any]) -> list[responses.TokenLogprob] | None:
        if not self.body.logprobs:
            return None
        return self.state.token_texts.entries([e for o in outputs for e in (o.new_logprobs or ())],
                                              self.body.return_tokens_as_token_ids)

    async def respond(self, generation: Generation) -> dict[str, Any]:
        """The whole chat.completion body."""
        text, logprobs, last = [], [], None
        async for outputs in generation.outputs():
            text.extend(o.new_text for o in outputs)
            logprobs.extend(self._logprobs(outputs) or ())
            last = outputs[-1]
        message = ParsedMessage.from_deltas([self.parser.feed("".join(text)), self.parser.finish()])
        generation.finish_reason = responses.finish_reason(last.finish_reason, bool(message.tool_calls))
        return responses.chat_completion(self.request_id, self.state.model_name, message, last.finish_reason,
                                         usage_of(last), logprobs if self.body.logprobs else None)

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        """The SSE events of a streamed chat completion; an engine failure midway is an error event."""
        chunks = responses.ChatChunks(self.state.model_name, self.body.include_usage, self.request_id)
        yield responses.sse_event(chunks.role())
        try:
            last = None
            async for outputs in generation.outputs():
                chunk = chunks.delta(self.parser.feed("".join(o.new_text for o in outputs)), self._logprobs(outputs))
                if chunk is not None:
                    yield responses.sse_event(chunk)
                last = outputs[-1]
            final = chunks.finish(last.finish_reason, self.parser.finish())
            generation.finish_reason = final["choices"][0]["finish_reason"]
            yield responses.sse_event(final)
            if self.body.include_usage:
                yield responses.sse_event(chunks.usage(usage_of(last)))
        except OpenAIError as error:
            yield responses.sse_event(error.body())
        yield responses.SSE_DONE

