"""Chat templates are untrusted code: whatever they raise, however long they loop and however much they try to
build, rendering ends in one line within its bounds. And the reasoning / tool-call tags survive decoding."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from bad_input import assert_one_line, run_cli

from moerun.backends.errors import MoerunError
from moerun.runtime import chat_template, demo
from moerun.runtime.chat_template import MAX_TEMPLATE_CHARS, TemplateFailure, compile_template, render
from moerun.runtime.tokenizer import VISIBLE_TAGS, Tokenizer


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    demo.write_demo_checkpoint(folder)
    return folder


def tokenizer_with_template(demo_folder, tmp_path, template: str) -> Tokenizer:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(demo_folder / name, folder / name)
    (folder / "chat_template.jinja").write_text(template)
    return Tokenizer.from_folder(folder)


def rendered(template: str, **context) -> str:
    return render(compile_template(template), {"messages": [], **context})


@pytest.mark.parametrize("template,message", [
    ("{{ 1 / 0 }}", "raised ZeroDivisionError: division by zero"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "raised RecursionError: maximum recursion depth exceeded"),
    ("{{ 2.0 ** 100000 }}", "raised OverflowError"),
    ("{{ messages + 1 }}", "raised TypeError"),
    ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
])
def test_any_exception_is_one_error(template, message, demo_folder, tmp_path):
    tok = tokenizer_with_template(demo_folder, tmp_path, template)
    with pytest.raises(MoerunError, match="chat template failed: ") as caught:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_failing_template_through_the_cli(demo_folder, tmp_path, capsys):
    tok_folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, tok_folder)
    (tok_folder / "chat_template.jinja").write_text("{{ 1 / 0 }}")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"backend: cpu\nmodel: {{path: {tok_folder}, dtype: float32}}\n")
    assert_one_line(*run_cli(["generate", "-c", cfg, "-p", "hi"], capsys),
                    "chat_template.jinja: chat template failed: raised ZeroDivisionError: division by zero")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # an empty loop body
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j % 7 }}{% endfor %}{% endfor %}",
])
def test_a_template_that_does_not_end_is_stopped(template, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.3)
    with pytest.raises(TemplateFailure, match=r"still running after 0.3 s|rendered prompt is longer"):
        rendered(template)


BUILDERS = {
    "repetition": "{{ 'a' * 1000000000 }}",
    "list_repetition": "{{ ([0] * 1000000000) | length }}",
    "power": "{% set n = 10 %}{{ n ** 1000000000 }}",
    "constant_power": "{{ 10 ** 1000000000 }}",  # would be folded at compile time by plain Jinja
    "concat_doubling": "{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 40 + "{{ s | length }}",
    "namespace_doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                          "{% endfor %}",
    "nested_lists": "{% set x = [1] %}" + "{% set x = [x, x] %}" * 60 + "{{ x }}",
    "nested_lists_tojson": "{% set x = [1] %}" + "{% set x = [x, x] %}" * 60 + "{{ x | tojson }}",
    "nested_lists_percent": "{% set x = [1] %}" + "{% set x = [x, x] %}" * 60 + "{{ '%s' % (x,) }}",
    "width_filter": "{{ 'a' | center(1000000000) }}",
    "width_method": "{{ 'a'.ljust(1000000000) }}",
    "percent_width": "{{ '%01000000000d' % 1 }}",
    "format_width": "{{ '{:>1000000000}'.format(1) }}",
    "replace_expansion": "{{ ('a' * 100000).replace('', 'b' * 100000) }}",
    "join_expansion": "{{ (['a'] * 100000) | join('x' * 100000) }}",
    "slices": "{{ [1, 2] | slice(1000000000) | list | length }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_values_and_output_are_bounded(name):
    with pytest.raises(TemplateFailure, match=str(MAX_TEMPLATE_CHARS) + r"|bits"):
        rendered(BUILDERS[name])


def test_bounds_leave_ordinary_templates_alone():
    assert rendered("{{ '=' * 20 }}{{ '%05d' % 42 }}{{ '{:>6}'.format('x') }}{{ 2 ** 64 }}") == \
        "=" * 20 + "00042" + "     x" + str(2**64)
    assert rendered("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                    "{{ ns.n }}|{{ messages | tojson }}", messages=[{"a": "<b>"}] * 3) == \
        "3|" + json.dumps([{"a": "<b>"}] * 3)


def test_the_watchdog_never_fires_after_a_render_returns(monkeypatch):
    """A deadline racing the end of each render: either the render fails with TemplateFailure or it returns,
    and nothing arrives afterwards."""
    template = compile_template("{% for i in range(2000) %}{{ i }}{% endfor %}")  # compiled within the real bound
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.0005)
    outcomes = set()
    for _ in range(100):
        try:
            outcomes.add(len(render(template, {})) > 0)
        except TemplateFailure:
            outcomes.add("stopped")
        sum(range(5000))  # bytecodes after the render, where a late exception would land
    assert outcomes <= {True, "stopped"}


def _stubborn(stops_to_drop: int, ended: threading.Event, release: threading.Event):
    """Work that loses its first `stops_to_drop` stops, as CPython loses one that lands in a weakref callback or a
    __del__ ("Exception ignored in ..."), and ends at the next (or when released)."""
    def work():
        dropped = 0
        try:
            while not release.is_set():
                try:
                    while not release.is_set():
                        sum(range(100))
                except chat_template._OutOfTime:
                    dropped += 1
                    if dropped > stops_to_drop:
                        raise
        finally:
            ended.set()
    return work


def test_a_lost_stop_is_raised_again(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    fired, ended, release = [], threading.Event(), threading.Event()
    raise_in_thread = chat_template._raise_in_thread
    monkeypatch.setattr(chat_template, "_raise_in_thread", lambda *a: (fired.append(1), raise_in_thread(*a)))
    with pytest.raises(TemplateFailure, match="still running after 0.2 s"):
        chat_template._within_time_limit(_stubborn(3, ended, release))
    assert ended.wait(5) and len(fired) >= 4


def test_the_caller_is_released_when_the_work_cannot_be_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    ended, release = threading.Event(), threading.Event()
    start = time.monotonic()
    try:
        with pytest.raises(TemplateFailure, match="still running after 0.2 s"):
            chat_template._within_time_limit(_stubborn(10**9, ended, release))
        assert time.monotonic() - start < 0.2 + chat_template.STOP_GRACE_SECONDS + 1.0
        assert not ended.is_set()  # it really was still running when the caller went on
    finally:
        release.set()
    assert ended.wait(5)


def test_reasoning_and_tool_tags_survive_decoding_when_marked_special(demo_folder, tmp_path):
    folder = tmp_path / "special"
    shutil.copytree(demo_folder, folder)
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    for token in tok_json["added_tokens"]:
        token["special"] = True  # as some re-exported tokenizers mark the think and tool-call tags
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    tok = Tokenizer.from_folder(folder)
    text = "]~b]ai\n<think>\nwhy\n</think>\n<minimax:tool_call>\n<invoke name=\"f\">\n</invoke>\n</minimax:tool_call>[e~["
    ids = tok.encode(text)
    decoded = tok.decode(ids)
    for tag in VISIBLE_TAGS:
        assert decoded.count(tag) == 1, decoded
    assert "]~b]" not in decoded and "[e~[" not in decoded  # the other special tokens are still skipped
    assert decoded == tok.decode(ids, skip_special_tokens=False).replace("]~b]", "").replace("[e~[", "")
