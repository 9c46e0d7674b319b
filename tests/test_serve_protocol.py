"""The OpenAI protocol layer: request validation (400s that name the field), the mapping to the engine's sampling
parameters, and response / chunk builders checked against the `openai` package's own types and its stream
accumulator, which is what clients use."""

from __future__ import annotations

import json
import re

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from moerun.runtime.parsers import ChatOutputParser, parse_chat_output
from moerun.runtime.serve import responses
from moerun.runtime.serve.errors import OpenAIError
from moerun.runtime.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from moerun.runtime.serve.responses import TokenLogprob
from moerun.runtime.serve.sampling_params import ENGINE_FIELDS, sampling_kwargs

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hello", **fields})


def rejected(model, body: dict) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_request(model, json.dumps(body))
    assert info.value.status == 400
    return info.value


# ---- validation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "greater than or equal to 1"),
    ({"n": 2}, "n", "only n=1"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": ["a", 3]}, "stop", "list of strings"),
    ({"seed": 2**64}, "seed", "less than or equal to"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only {'type': 'text'}"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "not in tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "cannot be set"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'system', 'developer'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0", "only text content parts"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "JSON object"),
])
def test_chat_requests_are_refused_with_the_field_named(fields, param, words):
    error = rejected(ChatCompletionRequest, {"model": "m", "messages": USER, **fields})
    assert error.param == param and words in error.message and error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, param, words", [
    ({"prompt": ["a", "b"]}, "prompt", "only one prompt"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [1, -2]}, "prompt.1", "greater than or equal to 0"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"best_of": 3}, "best_of", "best_of=1"),
])
def test_completion_requests_are_refused_with_the_field_named(fields, param, words):
    error = rejected(CompletionRequest, {"model": "m", "prompt": "hello", **fields})
    assert error.param == param and words in error.message


def test_a_body_that_is_not_json_is_a_400():
    with pytest.raises(OpenAIError) as info:
        parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [')
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_unknown_fields_are_ignored_and_batches_of_one_unwrapped():
    request = completion(prompt=[[1, 2, 3]], user="u", metadata={"a": 1}, store=False)
    assert request.prompt == [1, 2, 3]
    assert completion(prompt=["text"]).prompt == "text"


def test_tool_choice_decides_what_the_prompt_offers():
    other = {"type": "function", "function": {"name": "other"}}
    assert chat().offered_tools() is None and chat().effective_tool_choice == "none"
    assert chat(tools=[TOOL]).effective_tool_choice == "auto"
    assert chat(tools=[TOOL], tool_choice="none").offered_tools() is None
    assert [t["function"]["name"] for t in chat(tools=[TOOL, other], tool_choice="required").offered_tools()] == [
        "get_time", "other"]
    named = chat(tools=[TOOL, other], tool_choice={"type": "function", "function": {"name": "other"}})
    assert named.effective_tool_choice == "other" and named.offered_tools() == [other]


def test_the_output_parser_follows_the_prompt_and_the_tool_choice():
    output = 'Hm.</think>OK<minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>'
    parser = chat(tools=[TOOL]).output_parser("]~b]ai\n<think>\n", "split")
    deltas = [parser.feed(output), parser.finish()]
    assert (deltas[0].reasoning, deltas[0].content, deltas[0].tool_calls[0].name) == ("Hm.", "OK", "get_time")
    # no pre-filled <think>, and tool_choice "none": everything is content, the XML included
    parser = chat(tools=[TOOL], tool_choice="none").output_parser("]~b]ai\n", "split")
    assert parser.feed(output).content + parser.finish().content == output


def test_developer_messages_are_system_messages_to_the_template():
    request = chat(messages=[{"role": "developer", "content": "Be brief."}, *USER])
    assert request.template_messages() == [{"role": "system", "content": "Be brief."}, *USER]


# ---- the mapping to the engine's sampling parameters -----------------------------------------------------------

def test_every_engine_field_is_mapped_from_a_full_chat_request():
    request = chat(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
                   repetition_penalty=1.1, seed=7, stop="END", stop_token_ids=[5], ignore_eos=True, min_tokens=2,
                   max_completion_tokens=50, max_tokens=10, logprobs=True, top_logprobs=3)
    kwargs = sampling_kwargs(request, prompt_tokens=100, max_model_len=4096)
    assert sorted(kwargs) == sorted(ENGINE_FIELDS)
    assert kwargs == dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
                          frequency_penalty=-0.5, repetition_penalty=1.1, seed=7, max_tokens=50, stop=["END"],
                          stop_token_ids=[5], ignore_eos=True, min_tokens=2, logprobs=3, prompt_logprobs=None)


def test_unset_fields_take_the_checkpoint_defaults_then_openai_ones():
    kwargs = sampling_kwargs(chat(top_k=-1), prompt_tokens=10, max_model_len=100,
                             defaults={"temperature": 1.0, "top_p": 0.95, "top_k": 40})
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"]) == (1.0, 0.95, 0, 0.0)
    assert kwargs["repetition_penalty"] == 1.0 and kwargs["logprobs"] is None and kwargs["stop"] == []
    assert sampling_kwargs(chat(temperature=0), 10, 100, {"temperature": 0.6})["temperature"] == 0


def test_negative_seeds_keep_their_bits_as_unsigned_engine_seeds():
    assert sampling_kwargs(chat(seed=-1), 10, 100)["seed"] == 2**64 - 1
    assert sampling_kwargs(chat(seed=2**63 - 1), 10, 100)["seed"] == 2**63 - 1


def test_max_tokens_defaults():
    assert sampling_kwargs(chat(), prompt_tokens=30, max_model_len=100)["max_tokens"] == 70  # the rest of the context
    assert sampling_kwargs(completion(), prompt_tokens=30, max_model_len=100)["max_tokens"] == 16
    assert sampling_kwargs(completion(), prompt_tokens=95, max_model_len=100)["max_tokens"] == 5


def test_completion_logprobs_and_echo():
    assert sampling_kwargs(completion(logprobs=2), 3, 100)["logprobs"] == 2
    kwargs = sampling_kwargs(completion(logprobs=0, echo=True), 3, 100)
    assert (kwargs["logprobs"], kwargs["prompt_logprobs"]) == (0, 0)
    assert sampling_kwargs(completion(echo=True), 3, 100)["prompt_logprobs"] is None
    assert sampling_kwargs(chat(logprobs=True), 3, 100)["logprobs"] == 0


def test_over_the_context_limit_in_vllm_words():
    with pytest.raises(OpenAIError) as info:
        sampling_kwargs(chat(max_tokens=8192), prompt_tokens=8193, max_model_len=16384)
    error = info.value
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    assert error.message.startswith("This model's maximum context length is 16384 tokens. However, you requested "
                                    "16385 tokens (8193 in the messages, 8192 in the completion).")
    # what clients such as LiteLLM match to detect a context-window error
    assert re.search(r"maximum context length is (\d+) tokens", error.message).group(1) == "16384"
    with pytest.raises(OpenAIError, match=r"requested 101 tokens \(100 in the prompt, 1 in the completion\)"):
        sampling_kwargs(completion(max_tokens=None), prompt_tokens=100, max_model_len=100)


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(OpenAIError, match="min_tokens"):
        sampling_kwargs(completion(max_tokens=4, min_tokens=5), 3, 100)


# ---- responses and chunks, read back with the openai package ----------------------------------------------------

OUTPUT = ('Thinking.\n</think>\n\nSure.<minimax:tool_call>\n<invoke name="get_time">\n</invoke>\n'
          '<invoke name="unknown_tool">\n<parameter name="x">1</parameter>\n</invoke>\n</minimax:tool_call>')


def test_chat_completion_body_is_an_openai_chat_completion():
    entries = [TokenLogprob("Sure", -0.25, top=(TokenLogprob("Sure", -0.25), TokenLogprob("No", float("-inf"))))]
    body = responses.chat_completion("chatcmpl-1", "m", parse_chat_output(OUTPUT, [TOOL]), "stop",
                                     responses.usage(12, 7, cached_tokens=4), logprobs=entries)
    parsed = ChatCompletion.model_validate(body)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content, choice.message.model_extra["reasoning_content"]) == ("Sure.", "Thinking.")
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_time", "{}"), ("unknown_tool", '{"x": 1}')]
    assert choice.logprobs.content[0].top_logprobs[1].logprob == -9999.0  # JSON has no -inf
    assert choice.logprobs.content[0].bytes == list(b"Sure")
    assert (parsed.usage.total_tokens, parsed.usage.prompt_tokens_details.cached_tokens) == (19, 4)


def test_a_length_cut_stays_length_even_with_tool_calls():
    assert responses.finish_reason("length", called_tools=True) == "length"
    assert responses.finish_reason("stop", called_tools=False) == "stop"


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_streamed_chunks_accumulate_to_the_non_streamed_message(step):
    """openai's ChatCompletionStreamState, which clients use to rebuild a message from a stream, gets the same
    message from our chunks as the non-streamed body carries."""
    chunks_builder = responses.ChatChunks("m", include_usage=True)
    parser = ChatOutputParser([TOOL])
    chunks = [chunks_builder.role()]
    for i in range(0, len(OUTPUT), step):
        chunk = chunks_builder.delta(parser.feed(OUTPUT[i:i + step]))
        chunks += [chunk] if chunk else []
    chunks += [chunks_builder.finish("stop", parser.finish()), chunks_builder.usage(responses.usage(12, 7))]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    streamed = state.get_final_completion()
    whole = ChatCompletion.model_validate(responses.chat_completion(
        chunks_builder.id, "m", parse_chat_output(OUTPUT, [TOOL]), "stop", responses.usage(12, 7)))
    got, want = streamed.choices[0], whole.choices[0]
    assert got.finish_reason == want.finish_reason == "tool_calls"
    assert got.message.content == want.message.content
    assert got.message.model_extra["reasoning_content"] == want.message.model_extra["reasoning_content"]
    assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in want.message.tool_calls]
    assert streamed.usage == whole.usage
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    assert all(c["id"] == chunks_builder.id for c in chunks)


def test_no_chunk_names_a_tool_with_null():
    builder = responses.ChatChunks("m")
    parser = ChatOutputParser([TOOL])
    chunks = [builder.delta(parser.feed(ch)) for ch in OUTPUT] + [builder.finish("stop", parser.finish())]
    pieces = [t for c in chunks if c for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [p["function"]["name"] for p in pieces if "name" in p["function"]] == ["get_time", "unknown_tool"]
    assert all(p["function"]["name"] is not None for p in pieces if "name" in p["function"])
    assert "usage" not in chunks[-1]


def test_completion_body_and_chunks_are_openai_completions():
    entries = [TokenLogprob("Hel", -0.1, top=(TokenLogprob("Hel", -0.1),)), TokenLogprob("lo", -2.0)]
    body = responses.completion("cmpl-1", "m", "Hello", "length", responses.usage(3, 2),
                                responses.completion_logprobs(entries, text_offset=5))
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].logprobs.text_offset == [5, 8]
    assert parsed.choices[0].logprobs.top_logprobs == [{"Hel": -0.1}, {}]
    builder = responses.CompletionChunks("m", include_usage=True)
    assert builder.text("Hel") == {"id": builder.id, "object": "text_completion", "created": builder.created,
                                   "model": "m", "usage": None,
                                   "choices": [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]}
    assert Completion.model_validate(builder.finish("stop", "lo")).choices[0].finish_reason == "stop"
    assert Completion.model_validate(builder.usage(responses.usage(3, 2))).usage.total_tokens == 5


def test_echoed_prompt_logprobs_start_with_null():
    # The first prompt token has no logprob: OpenAI's legacy API and vLLM write null there.
    logprobs = responses.completion_logprobs([TokenLogprob("The", None), TokenLogprob(" cat", -3.5)])
    assert logprobs["token_logprobs"] == [None, -3.5] and logprobs["top_logprobs"][0] is None


def test_sse_framing():
    assert responses.sse_event({"a": "é"}) == 'data: {"a": "é"}\n\n' and responses.SSE_DONE == "data: [DONE]\n\n"
