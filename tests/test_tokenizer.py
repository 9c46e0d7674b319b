"""Tokenizer and chat template, checked against transformers' own tokenizer on the same files."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from moerun.runtime import demo
from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    demo.write_demo_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_folder(folder)


def hf_tokenizer(folder: Path, template: str):
    """The independent reference: transformers' fast tokenizer on the same tokenizer.json and template."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="]~!b[", eos_token="[e~[")
    ref.chat_template = template
    return ref


def copy_tokenizer(folder: Path, dest: Path, template: str | None = None) -> Path:
    dest.mkdir()
    shutil.copy(folder / "tokenizer.json", dest / "tokenizer.json")
    shutil.copy(folder / "tokenizer_config.json", dest / "tokenizer_config.json")
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    return dest


TOOLS = [
    {"type": "function", "function": {
        # Keys deliberately not sorted, with <, >, & and non-ASCII in the text: the HF tojson keeps them as is.
        "name": "get_weather",
        "description": "Weather <now> & later, in °C",
        "parameters": {"type": "object",
                       "properties": {"zeta_city": {"type": "string", "description": "city & country"},
                                      "alpha_days": {"type": "integer"}},
                       "required": ["zeta_city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
]

CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "hi"}], None),
    "system_multi_turn": ([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 14 + 28?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n42"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "times 2?"}]},
    ], None),
    "tool_loop": ([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
         "tool_calls": [
             {"type": "function", "function": {"name": "get_weather",
                                               "arguments": {"zeta_city": "Paris", "alpha_days": 3}}},
             {"type": "function", "function": {"name": "get_weather",
                                               "arguments": {"zeta_city": "Rome", "opts": {"b": 1, "a": "<x>"}}}},
         ]},
        {"role": "tool", "content": "sunny & 21 <C>"},
        {"role": "tool", "content": "hot, 29"},
    ], TOOLS),
    "tools_only": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "search cats"}],
                   TOOLS),
}


# --- text <-> ids ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "Hello world!", "  two  spaces\n\nand\ttabs\n",
                                  "naïve café, 日本語, emoji 🙂", "def add(a, b):\n    return a + b\n",
                                  '{"city": "Paris", "n": 42}'])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_adds_no_bos_and_matches_transformers(tok, folder):
    ref = hf_tokenizer(folder, "")
    text = "The weather <think>x</think> is [e~[ fine"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.bos_token_id not in tok.encode("hello")
    assert tok.encode("") == []


def test_special_tokens(tok):
    for content, special in demo.ADDED_TOKENS:
        ids = tok.encode(content)
        assert len(ids) == 1 and tok.id_to_token(ids[0]) == content
        # Control tokens vanish from decoded text; think / tool-call tags stay for the output parsers.
        assert tok.decode(ids) == ("" if special else content)
        assert tok.decode(ids, skip_special_tokens=False) == content
    assert tok.bos_token == "]~!b[" and tok.bos_token_id == tok.token_to_id("]~!b[")


def test_eos_ids(tok, folder, tmp_path):
    end = tok.token_to_id("[e~[")
    assert tok.eos_token_ids == (end,)
    # generation_config.json first, then config.json, then [e~[; ints or lists, no duplicates.
    other = copy_tokenizer(folder, tmp_path / "t")
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, end]}))
    (other / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_folder(other).eos_token_ids == (7, end, 9)
    (other / "generation_config.json").unlink()
    assert Tokenizer.from_folder(other).eos_token_ids == (9, end)


# --- chat template --------------------------------------------------------------------------------------------

def test_template_writes_bos_once_and_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == "]~!b[]~b]system\nBe brief.[e~[\n]~b]user\nhi[e~[\n]~b]ai\n<think>\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-2:] == [tok.token_to_id("<think>")] + tok.encode("\n")  # the tag is one token, as M2 expects
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("]~b]ai\n<think>\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_matches_transformers(tok, folder, name, generation_prompt):
    messages, tools = CONVERSATIONS[name]
    ref = hf_tokenizer(folder, (folder / "chat_template.jinja").read_text())
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt) == expected


def test_tool_schema_keeps_key_order_and_is_not_html_escaped(tok):
    messages, tools = CONVERSATIONS["tool_loop"]
    prompt = tok.apply_chat_template(messages, tools=tools)
    schema = json.dumps(TOOLS[0]["function"], ensure_ascii=False)
    assert f"<tool>{schema}</tool>" in prompt
    assert prompt.index("zeta_city") < prompt.index("alpha_days")
    assert "Weather <now> & later, in °C" in prompt and "\\u003c" not in prompt and "&amp;" not in prompt
    assert '<parameter name="opts">{"b": 1, "a": "<x>"}</parameter>' in prompt  # non-string args as JSON
    assert "]~b]tool\n<response>sunny & 21 <C></response>\n<response>hot, 29</response>[e~[\n" in prompt
    assert "<think>\nI need the tool.\n</think>\n\n<minimax:tool_call>\n" in prompt


def test_reasoning_only_after_last_user_message(tok):
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\nfirst"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "second", "reasoning": "new"}]  # `reasoning` alias
    prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert "]~b]ai\nfirst[e~[" in prompt and "old" not in prompt
    assert "]~b]ai\n<think>\nnew\n</think>\n\nsecond[e~[" in prompt


def test_openai_string_arguments_render_like_dicts(tok):
    messages, tools = CONVERSATIONS["tool_loop"]
    as_strings = copy.deepcopy(messages)
    for call in as_strings[1]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    before = copy.deepcopy(as_strings)
    assert tok.apply_chat_template(as_strings, tools=tools) == tok.apply_chat_template(messages, tools=tools)
    assert as_strings == before  # the caller's messages are not modified


# A template that depends on every environment setting: trim_blocks / lstrip_blocks whitespace, loopcontrols,
# tojson options, strftime_now, raise_exception, bos_token / eos_token and extra kwargs.
ENV_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if loop.index > 2 %}{% break %}{% endif %}
    {% if m.role == 'user' %}
U: {{ m.content }}
    {% else %}
A: {{ m.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}
{{ {'k': 'v', 'a': 1} | tojson(separators=(',', ':')) }}
{{ strftime_now('%Y') }} {{ flavour }}
{% if add_generation_prompt %}GEN{% endif %}
"""


def test_jinja_environment_matches_transformers(tok, folder, tmp_path):
    custom = Tokenizer.from_folder(copy_tokenizer(folder, tmp_path / "t", ENV_TEMPLATE))
    messages = [{"role": "user", "content": "x & <y>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "dropped by break"}]
    tools = [{"b": "<", "a": ["é", "&"]}]
    ours = custom.apply_chat_template(messages, tools=tools, flavour="vanilla")
    ref = hf_tokenizer(folder, ENV_TEMPLATE)
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                       flavour="vanilla")
    assert ours == expected
    assert "dropped" not in ours and f"{datetime.now():%Y} vanilla" in ours
    assert '[{"b": "<", "a": ["é", "&"]}]' in ours


def test_raise_exception_is_a_one_line_error(tok):
    with pytest.raises(MoerunError, match="unsupported message role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_from_tokenizer_config(folder, tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    for i, value in enumerate((template, named)):
        dest = copy_tokenizer(folder, tmp_path / f"t{i}")
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": value}))
        assert Tokenizer.from_folder(dest).apply_chat_template([{"role": "user", "content": "hi"}]) == "]~!b[hi"
    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    (dest / "chat_template.jinja").write_text("jinja file")
    assert Tokenizer.from_folder(dest).apply_chat_template([]) == "jinja file"


# --- errors ---------------------------------------------------------------------------------------------------

def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(e)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json_names_the_file(folder, tmp_path, name):
    dest = copy_tokenizer(folder, tmp_path / "t")
    (dest / name).write_text('{"truncated": ')
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_folder(dest)
    assert str(dest / name) in one_line(e)


def test_missing_template_fails_only_when_needed(folder, tmp_path):
    dest = copy_tokenizer(folder, tmp_path / "t")
    tok = Tokenizer.from_folder(dest)  # raw completion needs no template
    assert not tok.has_chat_template and tok.decode(tok.encode("ok")) == "ok"
    with pytest.raises(CheckpointError) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "chat_template.jinja" in one_line(e) and str(dest) in str(e.value)


def test_template_syntax_error_names_the_file(folder, tmp_path):
    dest = copy_tokenizer(folder, tmp_path / "t", "{% for m in messages %}{{ m.content }")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_folder(dest).apply_chat_template([])
    assert str(dest / "chat_template.jinja") in one_line(e)
