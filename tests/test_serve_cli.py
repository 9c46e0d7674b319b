"""`moerun serve` as an operator runs it: a subprocess on the embedded demo (no -c), the `openai` client against
it, the API key from MOERUN_API_KEY, the trained demo's tool call and reasoning, and a graceful stop on SIGINT; a
port in use is one line and exit code 2."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2
import jsonschema
import openai
import pytest

from moerun.runtime.cli import main

KEY = "sk-cli-test"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}


def moerun_serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moerun.runtime", "serve", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def stderr_lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read():
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def until(lines: queue.Queue, pattern: str, seen: list[str], timeout_s: float = 120.0) -> re.Match:
    while True:
        line = lines.get(timeout=timeout_s)
        assert line is not None, f"moerun serve ended before printing {pattern!r}:\n{''.join(seen)}"
        seen.append(line)
        if found := re.search(pattern, line):
            return found


@pytest.fixture(scope="module")
def demo_server():
    process = moerun_serve("--port", "0", "--no-access-log", env={"MOERUN_API_KEY": KEY})
    lines, seen = stderr_lines(process), []
    try:
        url = until(lines, r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1", seen).group(1)
        until(lines, r"Application startup complete", seen)
        yield url, process, lines, seen
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_demo_answers_the_openai_client_behind_its_key(demo_server):
    url, *_ = demo_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    (model,) = client.models.list().data
    assert model.id == "moerun-demo"
    answer = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=8)
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx2.get(f"{url}/health").status_code == 200


def test_the_demo_calls_the_weather_tool_and_reasons_about_sums(demo_server):
    """The trained demo (docs/demo.md), greedy: offered a weather tool, the weather question gets a tool call
    whose arguments fit the tool's JSON schema; an arithmetic question gets its working in reasoning_content.
    Both requests are in flight together."""
    url, *_ = demo_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

    def ask(question: str, **kwargs):
        return client.chat.completions.create(model="moerun-demo", messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=100, **kwargs).choices[0]

    with ThreadPoolExecutor(2) as pool:
        weather = pool.submit(ask, "What is the weather in Paris?", tools=[WEATHER_TOOL])
        arithmetic = pool.submit(ask, "What is 7 plus 5?")
        weather, arithmetic = weather.result(timeout=120), arithmetic.result(timeout=120)
    assert weather.finish_reason == "tool_calls", weather.message
    (call,) = weather.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    assert arithmetic.finish_reason == "stop" and arithmetic.message.content
    assert re.search(r"\d+ [-+*/] \d+ = \d+", arithmetic.message.model_extra["reasoning_content"]), arithmetic.message


def test_sigint_stops_it_gracefully(demo_server):
    url, process, lines, seen = demo_server
    process.send_signal(signal.SIGINT)
    until(lines, r"moerun serve: stopped", seen, timeout_s=60)
    assert process.wait(timeout=60) == 0
    assert not any("Traceback" in line for line in seen), "".join(seen)


def test_a_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
