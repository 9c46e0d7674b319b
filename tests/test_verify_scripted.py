"""`moerun verify`'s tool-calling and reasoning checks on a model that calls tools: moerun's server with its engine
replaced by a script (tests/scripted_engine.py) that reasons, then answers or calls tools as M2 writes them. The
manifest's reference answers are recorded from the same script by the function `moerun fingerprint` records them
with, so a faithful server passes; degraded ones fail the check that names the cause: a model that breaks a
schema, drops a parallel call or stops after its reasoning; a server that sorts argument keys, leaves tool calls
in the content, or leaves reasoning in it (moerun's own --reasoning-mode append_think and off). Also: an endpoint
with none of the features (tests/fake_openai_server.py) makes checks not possible rather than crash, and bad input
(unreachable, silent, wrong model, bad manifest, bad flags) is one line and exit 2."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from fake_openai_server import MODEL as FAKE_MODEL, FakeOpenAI, Script
from live_server import serve_in_thread
from moerun.runtime.answer_probes import record_answers
from moerun.runtime.cli import main
from moerun.runtime.fingerprint import fingerprint
from moerun.runtime.probe_set import PROBE_SET_VERSION
from moerun.runtime.tokenizer import Tokenizer
from scripted_engine import ScriptedEngine
from verify_servers import MODEL, calls_left_in_content, run_verify, served, sort_argument_keys

ANSWER_TOKENS = 256


def _calls(*invokes: tuple[str, dict]) -> str:
    """Tool calls as M2 writes them: one <invoke> per call, each parameter's value as text or JSON."""
    body = "".join(f'<invoke name="{name}">\n' + "".join(
        f'<parameter name="{k}">{v if isinstance(v, str) else json.dumps(v)}</parameter>\n' for k, v in args.items())
        + "</invoke>\n" for name, args in invokes)
    return f"<minimax:tool_call>\n{body}</minimax:tool_call>"


WEATHER_PARIS = {"location": "Paris", "unit": "celsius", "options": {"days": 3}}  # keys not in alphabetical order
GOOD = {
    "in celsius for the next 3 days": "A forecast is asked for.\n</think>\n\n" + _calls(("get_weather", WEATHER_PARIS)),
    "in Paris and in Tokyo": "Two cities, two calls.\n</think>\n\n" + _calls(
        ("get_weather", {"location": "Paris", "unit": "celsius"}),
        ("get_weather", {"location": "Tokyo", "unit": "celsius"})),
    "Tokyo (24h)": "Time, then weather.\n</think>\n\nChecking both." + _calls(
        ("get_time", {"zones": [{"zone": "Asia/Tokyo", "label": "Tokyo"}], "format": "24h"}),
        ("get_weather", {"location": "Tokyo"})),
    "17 × 24": "17 × 24 = 340 + 68 = 408.\n</think>\n\n408",
    "prime number": "11 and 13 are both prime.\n</think>\n\n13",
}


def scripted(outputs: dict[str, str]):
    def script(prompt: str) -> str:
        question = prompt.rsplit("]~b]user\n", 1)[-1]
        return next(text for key, text in outputs.items() if key in question)
    return script


@pytest.fixture(scope="module")
def tokenizer(demo_folder) -> Tokenizer:
    return Tokenizer.from_folder(demo_folder)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, tokenizer, demo_folder) -> Path:
    """The demo checkpoint's fingerprint with reference answers recorded from the good script (no logprob probes,
    no template counts: those checks have nothing to judge here)."""
    script = scripted(GOOD)
    data = fingerprint(demo_folder).to_json()
    data["probes"] = {"probe_set": PROBE_SET_VERSION, "configuration": {"source": "the good script"},
                      "max_new_tokens": 0, "cases": [],
                      "answers": record_answers(tokenizer, lambda ids, n: (script(tokenizer.decode(
                          ids, skip_special_tokens=False)), "stop"), ANSWER_TOKENS)}
    path = tmp_path_factory.mktemp("scripted") / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def verify(url: str, manifest: Path, *extra: str, model: str = MODEL) -> tuple[int, dict[str, dict], str]:
    """(exit code, check name -> its JSON result, the printed table)."""
    code, report, table = run_verify(url, manifest, manifest.parent / f"report-{time.monotonic_ns()}.json", *extra,
                                     model=model)
    return code, {c["name"]: c for c in report["checks"]}, table


def answers_verify(tokenizer, manifest, outputs=GOOD, **server) -> tuple[int, dict[str, dict], str]:
    with served(ScriptedEngine(tokenizer, scripted(outputs)), **server) as url:
        return verify(url, manifest, "--checks", "tools,reasoning")


def test_a_faithful_server_passes_tools_and_reasoning(tokenizer, manifest):
    code, checks, table = answers_verify(tokenizer, manifest)
    assert code == 0 and {n: c["verdict"] for n, c in checks.items()} == {"tools": "PASS", "reasoning": "PASS"}, table
    tools = checks["tools"]["figures"]
    assert (tools["triggered"], tools["reference_triggered"], tools["calls"], tools["invalid_calls"]) == (3, 3, 5, [])
    (one, *_) = tools["cases"]
    assert json.loads(one["calls"][0]["arguments"]) == WEATHER_PARIS
    assert tools["partings"] == {} and checks["reasoning"]["figures"]["partings"] == {}


BAD_MODEL = [
    ("schema", {**GOOD, "in celsius for the next 3 days": GOOD["in celsius for the next 3 days"].replace(
        '{"days": 3}', '{"days": "three"}')}, "tools", "case one-call: arguments of get_weather break its schema"),
    ("no parallel calls", {**GOOD, "in Paris and in Tokyo": "One call.\n</think>\n\n" + _calls(
        ("get_weather", {"location": "Paris"})), "Tokyo (24h)": "One call.\n</think>\n\n" + _calls(
        ("get_weather", {"location": "Tokyo"}))}, "tools",
     "2 of 3 cases decided otherwise than the reference (more than 1 parting at a near-tie): parallel-calls: 1 call(s) "
     "where the reference made 2 in parallel; two-tools: 1 call(s)"),
    ("reasoning only", {**GOOD, "17 × 24": "17 × 24 = 408.\n</think>\n\n", "prime number": "13.\n</think>\n\n"},
     "reasoning", "2 of 5 cases decided otherwise than the reference (more than 1 parting at a near-tie): arithmetic: "
     "a reasoning-only answer"),
]


def test_one_case_may_part_from_the_reference(tokenizer, manifest):
    """A greedy path that parts at a near-tie: one reasoning-only answer, or one tool case answered without a call,
    is not a failure on its own."""
    one_off = {**GOOD, "17 × 24": "17 × 24 = 408.\n</think>\n\n",
               "in Paris and in Tokyo": "Two cities.\n</think>\n\nParis is warmer."}
    code, checks, table = answers_verify(tokenizer, manifest, one_off)
    assert code == 0, table
    assert list(checks["tools"]["figures"]["partings"]) == ["parallel-calls"]
    assert list(checks["reasoning"]["figures"]["partings"]) == ["arithmetic"]


@pytest.mark.parametrize("what,outputs,failing,failure", BAD_MODEL, ids=[b[0] for b in BAD_MODEL])
def test_a_model_that_answers_worse_fails_the_check_that_names_it(what, outputs, failing, failure, tokenizer, manifest):
    code, checks, table = answers_verify(tokenizer, manifest, outputs)
    assert code == 1 and [n for n, c in checks.items() if c["verdict"] == "FAIL"] == [failing], table
    assert any(f.startswith(failure) for f in checks[failing]["failures"]), checks[failing]["failures"]


BAD_SERVER = [
    ("sorted argument keys", {"rewrite": sort_argument_keys}, "tools",
     "case one-call: call 0 (get_weather): argument keys in the order ['location', 'options', 'options.days', 'unit']"),
    ("no tool-call parser", {"rewrite": calls_left_in_content}, "tools",
     "case one-call: the calls left in the content as markup"),
    ("reasoning kept in the content", {"reasoning": "append_think"}, "reasoning",
     "case one-call: reasoning left in the content, tags and all"),
    ("no reasoning parser", {"reasoning": "off"}, "reasoning", "case one-call: reasoning left in the content"),
]


@pytest.mark.parametrize("what,server,failing,failure", BAD_SERVER, ids=[b[0] for b in BAD_SERVER])
def test_a_server_that_mangles_answers_fails_the_check_that_names_it(what, server, failing, failure, tokenizer,
                                                                     manifest):
    code, checks, table = answers_verify(tokenizer, manifest, **server)
    assert code == 1 and [n for n, c in checks.items() if c["verdict"] == "FAIL"] == [failing], table
    assert any(f.startswith(failure) for f in checks[failing]["failures"]), checks[failing]["failures"]


# ---- an endpoint without the features, and bad input --------------------------------------------------------------

@pytest.fixture(scope="module")
def fake(manifest):
    with serve_in_thread(FakeOpenAI(Script()).app) as url:
        yield f"{url}/v1"


def test_an_endpoint_without_the_features_makes_checks_not_possible(fake, manifest):
    """No logprobs, no echo, no reasoning, no tool calls: what cannot be checked says why; the rest is judged."""
    code, checks, table = verify(fake, manifest, model=FAKE_MODEL)
    assert {n: c["verdict"] for n, c in checks.items()} == {
        "logprobs": "NOT POSSIBLE", "template": "NOT POSSIBLE", "tools": "FAIL", "reasoning": "FAIL"}, table
    assert checks["logprobs"]["summary"] == "the manifest has no probe cases" and code == 1
    code, checks, table = verify(fake, manifest, "--checks", "logprobs", model=FAKE_MODEL)
    assert code == 0 and table.splitlines()[-1] == "PASS (not possible: logprob fidelity)"
    assert verify(fake, manifest, "--checks", "logprobs", "--strict", model=FAKE_MODEL)[0] == 1


def test_the_api_key_is_sent_and_a_refused_one_is_bad_input(tokenizer, manifest, capsys):
    with served(ScriptedEngine(tokenizer, scripted(GOOD)), api_key="sk-verify") as url:
        argv = ["verify", "--endpoint", url, "--model", MODEL, "--manifest", str(manifest), "--checks", "tools"]
        assert "refused the API key (HTTP 401)" in _one_line_error(argv, capsys)
        assert main(argv + ["--api-key", "sk-verify"]) == 0


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moerun: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(fake, manifest, tmp_path, capsys):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    silent = socket.socket()  # listens, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    plain = tmp_path / "plain.json"
    data = json.loads(manifest.read_text())
    plain.write_text(json.dumps({k: v for k, v in data.items() if k != "probes"}))  # hashes only
    damaged = tmp_path / "damaged.json"
    data["probes"]["answers"]["cases"][1]["reference"]["tool_calls"][0]["arguments"] = 3
    damaged.write_text(json.dumps(data))
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    args = ["verify", "--endpoint", fake, "--model", FAKE_MODEL, "--manifest", str(manifest)]
    cases = [
        (["verify", "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "m", "--manifest", str(manifest)],
         "cannot reach it"),
        (args[:2] + ["127.0.0.1:8000/v1"] + args[3:], "expected an http:// or https:// URL"),
        (args[:4] + ["another-model"] + args[5:], "not served at"),
        (args[:6] + [str(tmp_path / "missing.json")], "manifest not found"),
        (args[:6] + [str(not_json)], "not valid JSON"),
        (args[:6] + [str(plain)], "no reference probes"),
        (args[:6] + [str(damaged)], "probes.answers.cases[1].reference.tool_calls[0].arguments"),
        (args + ["--checks", "logprobs,speed"], "--checks: speed"),
        (args + ["--out", str(tmp_path / "no" / "r.json")], "--out"),
    ]
    for argv, fragment in cases:
        assert fragment in _one_line_error(argv, capsys), argv
    start = time.monotonic()
    line = _one_line_error(["verify", "--endpoint", f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "--model", "m",
                            "--manifest", str(manifest), "--timeout", "1"], capsys)
    assert re.search(r"cannot reach it .*within 1 s", line) and time.monotonic() - start < 30
    silent.close()

