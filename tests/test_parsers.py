"""MiniMax-M2 reasoning and tool-call parsers: the cases of the references (vLLM's and SGLang's parsers and their
bug reports, the M2 tool-calling guide), typed values, and streaming under every chunking equal to not streaming.

Expected values are written out by hand from the documented format, or generated together with the text they
are rendered into, so the parser is never its own oracle."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moerun.runtime.parsers import ChatDelta, ChatOutputParser, ParsedMessage, ToolCall, parse_chat_output
from moerun.runtime.parsers.values import typed_value

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array", "items": {"type": "integer"}}, "where": {"type": "object"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "limit": {"anyOf": [{"type": "integer"},
                                                                                       {"type": "null"}]}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "top": {"type": ["integer", "string"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, SEARCH, TIME]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def parse(text, tools=TOOLS, **kw) -> ParsedMessage:
    return parse_chat_output(text, tools, new_id=ids(), **kw)


def stream(text, pieces, tools=TOOLS, **kw) -> list[ChatDelta]:
    parser = ChatOutputParser(tools, new_id=ids(), **kw)
    return [parser.feed(p) for p in pieces] + [parser.finish()]


def call(n, name, arguments) -> ToolCall:
    return ToolCall(f"call_{n:024x}", name, json.dumps(arguments, ensure_ascii=False))


# ---- the documented format ------------------------------------------------------------------------------------

def test_reasoning_answer_and_parallel_calls():
    # minimax_m2.md 4.3: the prompt pre-filled `<think>\n`; several invokes in one block are parallel calls.
    text = ("The user wants the weather.\n</think>\n\nLet me check.<minimax:tool_call>\n"
            '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
            '<parameter name="days">3</parameter>\n</invoke>\n'
            '<invoke name="search">\n<parameter name="query">Paris events</parameter>\n</invoke>\n'
            "</minimax:tool_call>")
    assert parse(text) == ParsedMessage("Let me check.", "The user wants the weather.", (
        call(0, "get_weather", {"city": "Paris", "days": 3}), call(1, "search", {"query": "Paris events"})))


def test_ids_are_call_and_24_hex():
    message = parse_chat_output('</think><minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>',
                                TOOLS)
    (only,) = message.tool_calls
    assert only.id.startswith("call_") and len(only.id) == 29 and int(only.id[5:], 16) >= 0


def test_no_parameter_invoke_gives_an_empty_object():
    # SGLang PR #36691: a call without parameters must still carry "{}".
    message = parse('</think><minimax:tool_call>\n<invoke name="get_time">\n</invoke>\n</minimax:tool_call>')
    assert message.tool_calls == (call(0, "get_time", {}),)
    assert message.content is None


def test_several_blocks_and_the_text_between_them():
    text = ('</think>A<minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>\nignored\n'
            '<minimax:tool_call><invoke name="search"><parameter name="query">x</parameter></invoke>'
            '<invoke name="get_time"></invoke></minimax:tool_call>trailing')
    message = parse(text)
    assert message.content == "A"
    assert message.tool_calls == (call(0, "get_time", {}), call(1, "search", {"query": "x"}), call(2, "get_time", {}))


def test_a_name_not_in_the_tools_is_still_a_call_with_untyped_values():
    # vLLM emits such a call, SGLang turns it into text; moerun emits it (docs/serving.md says why). Without a
    # schema a value is read as JSON when it is JSON, else kept as text.
    text = ('</think><minimax:tool_call><invoke name="launch_rocket"><parameter name="count">3</parameter>'
            '<parameter name="target">Mars</parameter><parameter name="opts">{"safe": true}</parameter>'
            "</invoke></minimax:tool_call>")
    assert parse(text).tool_calls == (call(0, "launch_rocket", {"count": 3, "target": "Mars", "opts": {"safe": True}}),)


def test_quoted_and_unquoted_names():
    text = ("</think><minimax:tool_call><invoke name='search'><parameter name=query>a</parameter></invoke>"
            '<invoke name=get_time></invoke></minimax:tool_call>')
    assert parse(text).tool_calls == (call(0, "search", {"query": "a"}), call(1, "get_time", {}))


def test_unicode_stays_unescaped():
    text = ('</think>天气如何？<minimax:tool_call><invoke name="get_weather"><parameter name="city">北京 😀</parameter>'
            "</invoke></minimax:tool_call>")
    message = parse(text)
    assert message.content == "天气如何？"
    assert message.tool_calls[0].arguments == '{"city": "北京 😀"}'


def test_without_tools_the_xml_stays_in_the_content():
    text = '</think>Hi<minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>'
    assert parse(text, tools=None) == ParsedMessage(text.removeprefix("</think>"), None)


def test_a_parameter_written_twice_keeps_its_first_value():
    text = ('</think><minimax:tool_call><invoke name="search"><parameter name="query">a</parameter>'
            '<parameter name="query">b</parameter><parameter name="top">2</parameter></invoke></minimax:tool_call>')
    assert parse(text).tool_calls == (call(0, "search", {"query": "a", "top": 2}),)


@pytest.mark.parametrize("text, expected", [
    # cut off inside a parameter: the parameters completed before the cut are kept
    ('<invoke name="search"><parameter name="top">2</parameter><parameter name="query">Par', [("search", {"top": 2})]),
    # cut off inside the name: no call (the name may be incomplete)
    ('<invoke name="get_wea', []),
    # closing tags the model forgot: the next invoke, or the block's end, close the open one
    ('<invoke name="get_time"><invoke name="search"><parameter name="query">q</parameter></minimax:tool_call>',
     [("get_time", {}), ("search", {"query": "q"})]),
    ('<invoke name="search"><parameter name="query">q</invoke>', [("search", {"query": "q"})]),
])
def test_unfinished_or_unclosed_calls(text, expected):
    message = parse("</think>Answer<minimax:tool_call>" + text)
    assert message.content == "Answer"
    assert message.tool_calls == tuple(call(i, name, args) for i, (name, args) in enumerate(expected))


# ---- values typed by the schema -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, schema, expected", [
    ("3", {"type": "integer"}, 3),
    ("-12", {"type": "integer"}, -12),
    ("3.5", {"type": "integer"}, 3.5),  # not an integer: read as JSON
    ("2.50", {"type": "number"}, 2.5),
    ("7", {"type": "number"}, 7),
    ("1e3", {"type": "number"}, 1000.0),
    ("inf", {"type": "number"}, "inf"),  # JSON has no infinity: kept as text
    ("NaN", None, "NaN"),
    ("True", {"type": "boolean"}, True),
    ("no", {"type": "boolean"}, False),
    ('{"lat": 1.5, "lon": [2]}', {"type": "object"}, {"lat": 1.5, "lon": [2]}),
    ("[1, 2]", {"type": "object"}, [1, 2]),  # not an object: read as JSON anyway
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("{broken", {"type": "object"}, "{broken"),
    ("42", {"type": "string"}, "42"),
    ("none", {"type": "string"}, "none"),  # a string-only schema keeps the word
    ("none", {"type": "string", "enum": ["none", "all"]}, "none"),
    ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
    ("Nil", None, None),
    ("5", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5),
    ("12", {"type": ["integer", "string"]}, 12),
    ("twelve", {"type": ["integer", "string"]}, "twelve"),
    ("2", {"enum": [1, 2, 3]}, 2),
    ("b", {"enum": ["a", "b"]}, "b"),
    ("0.5", {"oneOf": [{"type": "number"}, {"type": "string"}]}, 0.5),
    ('"quoted"', None, "quoted"),
    ("12", None, 12),
    ("plain words", None, "plain words"),
    (" 4 ", {"type": "integer"}, 4),
    ("  indented\n- line", {"type": "string"}, "  indented\n- line"),  # strings keep their whitespace
    ("  indented", None, "  indented"),
])
def test_typed_values(raw, schema, expected):
    value = typed_value(raw, schema)
    assert value == expected and type(value) is type(expected)


def test_framing_newlines_of_a_value_are_dropped():
    text = ('</think><minimax:tool_call><invoke name="search"><parameter name="query">\n  def f():\n    pass\n'
            '</parameter></invoke></minimax:tool_call>')
    assert json.loads(parse(text).tool_calls[0].arguments) == {"query": "  def f():\n    pass"}


# ---- reasoning ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, reasoning, content", [
    ("Thinking.\n</think>\n\nHello!", "Thinking.", "Hello!"),  # M2: only the end tag (the prompt pre-filled <think>)
    ("<think>\nThinking.\n</think>\n\nHello!", "Thinking.", "Hello!"),  # M2.5+: both tags (vLLM #38212)
    ("Still thinking when cut off", "Still thinking when cut off", None),
    ("</think>\n\nHello!", None, "Hello!"),
    ("Thinking.</think>", "Thinking.", None),
    ("a</think>b<think>c</think>d", "a", "b<think>c</think>d"),  # only the first </think> counts
])
def test_reasoning_split(text, reasoning, content):
    assert parse(text) == ParsedMessage(content, reasoning)


def test_output_not_started_in_reasoning():
    # A prompt that did not pre-fill <think>: text is content unless the output opens a think block itself.
    assert parse("Hello!", starts_in_reasoning=False) == ParsedMessage("Hello!", None)
    assert parse("<think>hm</think>Hello!", starts_in_reasoning=False) == ParsedMessage("Hello!", "hm")


def test_append_think_keeps_the_reasoning_in_the_content():
    # vLLM minimax_m2_append_think: content = "<think>" + output; a <think> the model wrote is not doubled.
    text = "Thinking.\n</think>\n\nHello!"
    assert parse(text, reasoning="append_think") == ParsedMessage("<think>" + text, None)
    assert parse("<think>" + text, reasoning="append_think") == ParsedMessage("<think>" + text, None)


def test_append_think_with_tool_calls():
    text = 'Hm.</think>\n\nOK<minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>'
    assert parse(text, reasoning="append_think") == ParsedMessage("<think>Hm.</think>\n\nOK", None,
                                                                  (call(0, "get_time", {}),))


def test_tool_calls_inside_the_reasoning_are_not_calls():
    text = 'I could write <minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call></think>Done.'
    message = parse(text)
    assert message.tool_calls == () and message.content == "Done."
    assert message.reasoning_content == text.split("</think>")[0]


def test_reasoning_off_passes_everything_through():
    assert parse("a</think>b", reasoning="off", tools=None) == ParsedMessage("a</think>b", None)


def test_unknown_reasoning_mode_is_refused():
    with pytest.raises(ValueError, match="append_think"):
        ChatOutputParser(reasoning="think")


# ---- streaming ------------------------------------------------------------------------------------------------

def test_a_partial_start_tag_is_held_back():
    # SGLang PR #36691: "<minimax:tool" at the end of a chunk was flushed as text.
    deltas = stream("", ["</think>Hello <minimax:tool", '_call><invoke name="get_time">', "</invoke>"])
    assert [d.content for d in deltas] == ["Hello ", "", "", ""]
    assert deltas[1].tool_calls[0].name == "get_time" and deltas[2].tool_calls[0].arguments == "{}"


def test_a_partial_end_of_think_is_held_back():
    deltas = stream("", ["Reasoning</th", "ink>\n\nAnswer"])
    assert (deltas[0].reasoning, deltas[0].content) == ("Reasoning", "")
    assert (deltas[1].reasoning, deltas[1].content) == ("", "Answer")


def test_what_only_looked_like_a_tag_is_released():
    deltas = stream("", ["</think>a <minimax:tool", "tip> b"])
    assert "".join(d.content for d in deltas) == "a <minimax:tooltip> b"
    assert deltas[0].content == "a "


def test_name_once_then_one_fragment_per_parameter():
    # SGLang #23071 sent name=null and duplicated arguments; vLLM #35895 dropped arguments with coarse chunks.
    pieces = ["</think><minimax:tool_call>\n<invoke name=\"get_weather\">\n", '<parameter name="city">Paris</parameter>\n',
              '<parameter name="days">2</parameter>\n', "</invoke>\n</minimax:tool_call>"]
    deltas = [d.tool_calls for d in stream("", pieces)]
    assert [[(t.index, t.id, t.name, t.arguments) for t in d] for d in deltas] == [
        [(0, "call_" + "0" * 24, "get_weather", "")], [(0, None, None, '{"city": "Paris"')],
        [(0, None, None, ', "days": 2')], [(0, None, None, "}")], []]


def test_one_coarse_chunk_carries_whole_calls():
    text = ('</think>Hi<minimax:tool_call><invoke name="get_time"></invoke><invoke name="search">'
            '<parameter name="query">q</parameter></invoke></minimax:tool_call>')
    (delta, last) = stream("", [text])
    assert delta.content == "Hi" and not last
    assert [(t.index, t.name, t.arguments) for t in delta.tool_calls] == [(0, "get_time", "{}"),
                                                                        (1, "search", '{"query": "q"}')]


# Text that must survive any chunking: tag fragments, newlines, multi-byte characters.
_TEXT = st.lists(st.sampled_from(list("ab <>/=\"'\n é中😀") + ["<minimax:tool", "</thi", "<think", "</invoke",
                                                                  "<parameter", "</param", "<invoke name="]),
                max_size=12).map("".join)


def _without(*tags):
    return lambda text: not any(tag in text for tag in tags)


_REASONING = _TEXT.filter(_without("<think>", "</think>"))
_CONTENT = _TEXT.filter(_without("<minimax:tool_call>"))
_STRING = _TEXT.filter(_without("</parameter>", "</invoke>", "</minimax:tool_call>"))


@st.composite
def _model_outputs(draw):
    """(output text, tools, expected reasoning, content, [(name, arguments)]) for a random well-formed output."""
    reasoning = draw(_REASONING)
    content = draw(_CONTENT)
    blocks = []
    for _ in range(draw(st.integers(0, 2))):
        invokes = []
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(["get_weather", "search", "get_time", "not_a_tool"]))
            params = []
            if name == "get_weather":
                params = draw(st.lists(st.sampled_from([
                    ("city", draw(_STRING), None), ("days", None, draw(st.integers(-99, 999))),
                    ("metric", None, draw(st.booleans())), ("hours", None, draw(st.lists(st.integers(0, 23)))),
                    ("unit", "fahrenheit", None)]), unique_by=lambda p: p[0]))
            elif name == "search":
                params = [("query", draw(_STRING), None)]
            elif name == "not_a_tool":
                params = [("n", None, draw(st.integers(0, 9)))]
            invokes.append((name, params))
        blocks.append(invokes)
    newline = draw(st.sampled_from(["", "\n"]))
    text = draw(st.sampled_from(["", "<think>", "<think>\n"])) + reasoning + "\n</think>\n\n" + content
    calls = []
    for invokes in blocks:
        text += newline + "<minimax:tool_call>" + newline
        for name, params in invokes:
            text += f'<invoke name="{name}">' + newline
            arguments = {}
            for key, string, value in params:
                # strings are written as they are (one framing newline each side optional); others as JSON
                written = string if string is not None else json.dumps(value)
                frame = "\n" if string and (string[0] == "\n" or string[-1] == "\n") else newline
                text += f'<parameter name="{key}">{frame}{written}{frame}</parameter>' + newline
                arguments[key] = string if string is not None else value
            text += "</invoke>" + newline
            calls.append((name, arguments))
        text += "</minimax:tool_call>" + newline
    return text, reasoning.strip("\n") or None, content.strip("\n") or None, calls


def _chunkings(text: str, seed: int):
    rng = random.Random(seed)
    yield list(text)  # one character at a time
    yield [text]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
    yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _assert_stream_is_well_formed(deltas: list[ChatDelta]) -> None:
    seen_ids = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.id is not None:
                assert piece.index not in seen_ids and piece.name is not None  # name once, never null
                seen_ids[piece.index] = piece.id
            else:
                assert piece.index in seen_ids and piece.name is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_model_outputs(), st.integers(0, 2**16))
def test_streaming_equals_parsing_at_once_under_any_chunking(case, seed):
    text, reasoning, content, calls = case
    whole = parse(text)
    expected_calls = tuple(call(i, name, args) for i, (name, args) in enumerate(calls))
    assert whole == ParsedMessage(content, reasoning, expected_calls)
    for pieces in _chunkings(text, seed):
        deltas = stream(text, pieces)
        _assert_stream_is_well_formed(deltas)
        assert ParsedMessage.from_deltas(deltas) == whole
