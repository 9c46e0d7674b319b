"""What the parsers hand a client goes back into the chat template unchanged: parse the model's text, send the
OpenAI message (and tool results) back as a client would, render it with the demo checkpoint's M2 template, and
the assistant turn is the text the model wrote."""

from __future__ import annotations

import json

import pytest

from moerun.runtime import demo
from moerun.runtime.parsers import parse_chat_output
from moerun.runtime.serve.protocol import ChatCompletionRequest
from moerun.runtime.serve.responses import message_dict
from moerun.runtime.tokenizer import Tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"},
                                         "hours": {"type": "array", "items": {"type": "integer"}},
                                         "where": {"type": "object"},
                                         "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
USER = {"role": "user", "content": "Weather in Beijing and the time?"}

# The model's output after the generation prompt `]~b]ai\n<think>\n`, written the way the template writes a turn.
CALLS_XML = ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">北京 (Beijing)</parameter>\n'
             '<parameter name="days">3</parameter>\n<parameter name="metric">true</parameter>\n'
             '<parameter name="hours">[6, 18]</parameter>\n<parameter name="where">{"lat": 39.9, "lon": 116.4}'
             '</parameter>\n<parameter name="limit">null</parameter>\n</invoke>\n'
             '<invoke name="get_time">\n</invoke>\n</minimax:tool_call>')
OUTPUT = "The user wants two things.\nCall both tools.\n</think>\n\nChecking both." + CALLS_XML


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("m2_template")
    (folder / "tokenizer.json").write_text(demo.build_tokenizer_json()[0], encoding="utf-8")
    (folder / "chat_template.jinja").write_text(demo.CHAT_TEMPLATE, encoding="utf-8")
    return Tokenizer.from_folder(folder)


def _client_roundtrip(message: dict) -> dict:
    """The message as a client sends it back: through JSON, minus the fields a client does not echo."""
    sent = json.loads(json.dumps(message))
    return {k: v for k, v in sent.items() if v is not None}


def test_split_reasoning_renders_back_to_the_model_output(tok):
    message = message_dict(parse_chat_output(OUTPUT, TOOLS))
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "city": "北京 (Beijing)", "days": 3, "metric": True, "hours": [6, 18], "where": {"lat": 39.9, "lon": 116.4},
        "limit": None}
    prompt = tok.apply_chat_template([USER], tools=TOOLS, add_generation_prompt=True)
    rendered = tok.apply_chat_template([USER, _client_roundtrip(message)], tools=TOOLS, add_generation_prompt=False)
    assert prompt.endswith("]~b]ai\n<think>\n")
    assert rendered == prompt + OUTPUT + "[e~[\n"


def test_append_think_content_renders_back_the_same(tok):
    message = message_dict(parse_chat_output(OUTPUT, TOOLS, reasoning="append_think"))
    assert message["reasoning_content"] is None and message["content"].startswith("<think>")
    prompt = tok.apply_chat_template([USER], tools=TOOLS, add_generation_prompt=True)
    rendered = tok.apply_chat_template([USER, _client_roundtrip(message)], tools=TOOLS, add_generation_prompt=False)
    assert rendered == prompt + OUTPUT + "[e~[\n"


def test_tool_results_follow_the_calls_through_the_request_model(tok):
    # The whole agent loop as a client drives it: the request body it would send next, validated by the server's
    # request model, then rendered. The calls keep their XML and the results follow in call order.
    message = message_dict(parse_chat_output(OUTPUT, TOOLS))
    results = [{"role": "tool", "tool_call_id": c["id"], "content": text}
               for c, text in zip(message["tool_calls"], ["Sunny, 21 °C", "14:05"])]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [USER, _client_roundtrip(message), *results], "tools": TOOLS})
    rendered = tok.apply_chat_template(request.template_messages(), tools=request.offered_tools(),
                                       add_generation_prompt=True)
    turn = rendered.split("]~b]ai\n")[1]
    assert CALLS_XML in turn
    assert rendered.endswith("[e~[\n]~b]tool\n<response>Sunny, 21 °C</response>\n<response>14:05</response>[e~[\n"
                             "]~b]ai\n<think>\n")
