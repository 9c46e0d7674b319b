"""The trained demo shipped as builtin:demo: intact, in the release layout, and it behaves as trained.

What it is checked against: its manifest (hashes recomputed here), transformers' MiniMaxM2ForCausalLM on the same
files, conversations the corpus generator draws with a seed training never used, the corpus vocabulary, the tool
schemas offered in each request (jsonschema), and the CPU backend against the emulated Ascend backend. Greedy
outputs are judged by measurable properties (a loss bound, known words, finished sentences, a parsed tool call
that fits its schema), never compared with fixed strings. docs/demo.md records what the demo gets right and wrong.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import random
import re
import shutil
import tomllib
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors import safe_open

from moerun.backends.errors import CheckpointError
from moerun.runtime import demo, trained_demo
from moerun.runtime.commands.common import load_target
from moerun.runtime.engine import Engine
from moerun.runtime.parity import calibrated_verdict
from moerun.runtime.parsers import parse_chat_output
from moerun.runtime.run_config import parse_run_config
from moerun.runtime.sampling_params import SamplingParams

from demo_english import demo_corpus, is_sentence, known_share, words

ROOT = Path(__file__).resolve().parents[1]

HELDOUT_SEED = 2024  # training drew its corpus with seed 0 and its own held-out evaluation with seed 1
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def cpu_engine(dtype: str = "float32") -> Engine:
    return Engine(parse_run_config({"backend": "cpu", "model": {"path": "builtin:demo", "dtype": dtype}}, ROOT))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return cpu_engine()


# --- the shipped files ------------------------------------------------------------------------------------------

def test_shipped_files_match_their_manifest():
    folder = trained_demo.shipped_folder()
    manifest = json.loads((folder / demo.MANIFEST).read_text())
    assert manifest["version"] == trained_demo.VERSION
    assert sorted(p.name for p in folder.iterdir()) == sorted([*trained_demo.FILES, demo.MANIFEST])
    for name, expected in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == expected["size"] and hashlib.sha256(data).hexdigest() == expected["sha256"], name
    assert trained_demo.trained_demo_folder() == folder
    # ... and every one of them goes into a built package, not only into an editable install.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["moerun.configs"]
    assert all(any(fnmatch.fnmatch(f"demo_model/{p.name}", pat) for pat in patterns) for p in folder.iterdir())


def test_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "demo_model"
    shutil.copytree(trained_demo.shipped_folder(), copy)
    shard = copy / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(trained_demo, "shipped_folder", lambda: copy)
    with pytest.raises(CheckpointError, match="reinstall"):
        trained_demo.trained_demo_folder()


def test_the_embedded_default_is_the_shipped_model():
    assert load_target(None).folder == trained_demo.shipped_folder()


def test_release_layout():
    folder = trained_demo.shipped_folder()
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "minimax_m2" and raw["scoring_func"] == "sigmoid" and raw["use_routing_bias"]
    assert raw["rotary_dim"] < raw["head_dim"]  # partial RoPE, in both the legacy and the new field
    assert raw["rope_parameters"]["partial_rotary_factor"] == raw["rotary_dim"] / raw["head_dim"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for file in shards:
        with safe_open(str(folder / file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                router = name.endswith("gate.weight") or name.endswith("e_score_correction_bias")
                assert t.dtype == (torch.float32 if router else torch.bfloat16), name
                if name.endswith("e_score_correction_bias"):
                    assert t.abs().max() > 0  # moved by the load-balancing update during training


def test_transformers_reads_the_same_model(engine):
    """transformers' own MiniMaxM2ForCausalLM on the shipped files gives the logits moerun gives."""
    from transformers import MiniMaxM2ForCausalLM

    folder = trained_demo.shipped_folder()
    model, info = MiniMaxM2ForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.config._attn_implementation = "eager"
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}],
                                             tools=[WEATHER_TOOL]))
    with torch.no_grad():
        ref = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    ours = engine.logits(ids)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# --- what it learned --------------------------------------------------------------------------------------------

def trained_tokens(tok, text: str) -> tuple[list[int], list[bool]]:
    """A conversation's token ids, and for each whether it is one the model was trained to write: the assistant
    turns after the last user message, from just after `]~b]ai\\n` through `[e~[`. Both ends are token
    boundaries (a newline before, an added token at the end), so the pieces encode apart as the whole does."""
    cuts, last_question = [0], text.rindex("]~b]user\n")
    for m in re.finditer(re.escape("]~b]ai\n"), text[last_question:]):
        begin = last_question + m.end()
        cuts += [begin, text.index("[e~[", begin) + len("[e~[")]
    cuts.append(len(text))
    ids, trained = [], []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        piece = tok.encode(text[a:b])
        ids += piece
        trained += [i % 2 == 1] * len(piece)
    assert ids == tok.encode(text)
    return ids, trained


def test_heldout_loss_is_low(engine):
    """Mean next-token loss, through moerun's logits, on the tokens the model was trained to write, in
    conversations training never saw. Guessing uniformly over the vocabulary would be ln(2048) = 7.6 nats per
    token; training measured 0.50 on its own held-out draw."""
    total, count = 0.0, 0
    for text in demo_corpus.render_conversations(HELDOUT_SEED, count=12):
        ids, trained = trained_tokens(engine.tokenizer, text)
        logp = engine.logits(ids).log_softmax(-1)
        positions = [i for i in range(1, len(ids)) if trained[i]]
        total -= sum(logp[i - 1, ids[i]].item() for i in positions)
        count += len(positions)
    assert total / count < 0.55, total / count  # measured: 0.40


def heldout_prompts(kind: str, count: int) -> list[tuple[list[dict], list | None, dict]]:
    """The first `count` held-out conversations whose reference answer to the last question is of `kind`:
    "call" (a tool call) or "sentence" (an answer of four words or more, not a bare sum). Each is (messages up to
    that question, the tools offered, the reference assistant turn)."""
    rng, found = random.Random(HELDOUT_SEED), []
    while len(found) < count:
        messages, tools = demo_corpus.conversation(rng)
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        reference = messages[last + 1]
        is_call = bool(reference.get("tool_calls"))
        if kind == ("call" if is_call else "sentence" if len(words(reference["content"])) >= 4 else None):
            found.append((messages[:last + 1], tools, reference))
    return found


@pytest.fixture(scope="module")
def heldout_answers(engine):
    """Greedy answers to 6 held-out questions a tool answers and 6 answered in a sentence, in one batch."""
    cases = heldout_prompts("call", 6) + heldout_prompts("sentence", 6)
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(m, tools=t)) for m, t, _ in cases]
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=80))
    return [(case, out, parse_chat_output(out.output_text, tools=case[1])) for case, out in zip(cases, outputs)]


def test_every_answer_reasons_first_and_finishes(heldout_answers):
    for (messages, _, _), out, parsed in heldout_answers:
        assert out.finish_reason == "stop", (messages[-1], out.output_text)
        assert len(words(parsed.reasoning_content)) >= 4, (messages[-1], out.output_text)
        assert known_share(parsed.reasoning_content) >= 0.9, out.output_text


def test_questions_that_need_no_tool_get_english_sentences(heldout_answers):
    fluent = [not parsed.tool_calls and is_sentence(parsed.content)
              for (_, _, reference), _, parsed in heldout_answers if not reference.get("tool_calls")]
    assert sum(fluent) >= 5, [(c[0][-1]["content"], o.output_text) for c, o, _ in heldout_answers]  # measured: 6 of 6


def test_questions_a_tool_answers_get_a_schema_valid_call_of_that_tool(heldout_answers):
    right = 0
    for (_, tools, reference), out, parsed in heldout_answers:
        if not reference.get("tool_calls"):
            continue
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for call in parsed.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])  # every call it makes fits
        right += [c.name for c in parsed.tool_calls][:1] == [reference["tool_calls"][0]["function"]["name"]]
    assert right >= 4, [o.output_text for _, o, _ in heldout_answers]  # measured: 5 of 6


# --- other backends ---------------------------------------------------------------------------------------------

def test_cpu_and_emulated_ascend_agree_in_bf16(engine):
    """The calibrated verdict of `moerun parity`: the emulated Ascend run in bf16 is about as close to a float32 run
    (HP) as the CPU reference's bf16 run is, over held-out conversations. (The fixed verdict fails even CPU fp32
    against CPU bf16 here: the untrained prompt positions have flat distributions whose top-1 rounding flips;
    docs/demo.md has the figures.)"""
    ids = [engine.tokenizer.encode(t) for t in demo_corpus.render_conversations(HELDOUT_SEED, count=3)]
    ascend = Engine(parse_run_config({"backend": "ascend", "model": {"path": "builtin:demo", "dtype": "bfloat16"},
                                      "kv_cache": {"block_size": 128, "num_blocks": 16},
                                      "ascend": {"emulate": True}}, ROOT))
    hp, cpu, candidate = (torch.cat([e.logits(x) for x in ids]) for e in (engine, cpu_engine("bfloat16"), ascend))
    verdict = calibrated_verdict(hp, cpu, candidate)
    assert verdict.floor.positions >= 500 and verdict.passed, verdict.failures
