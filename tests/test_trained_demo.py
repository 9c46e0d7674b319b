"""The trained demo shipped as builtin:demo: intact, in the release layout, and it behaves as trained.

What it is checked against: its manifest (hashes), transformers' MiniMaxM2ForCausalLM on the same files, held-out
conversations drawn by the corpus generator with a seed training never used, the corpus vocabulary, the tool
schema given in the request, and the CPU backend against the emulated Ascend backend. Greedy outputs are judged by
measurable properties (loss bound, known words, a parsed tool call with the question's city), never compared
with fixed strings.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moerun.runtime import demo, trained_demo
from moerun.runtime.cli import main
from moerun.runtime.engine import Engine
from moerun.runtime.parity import Thresholds, compare_logits
from moerun.runtime.run_config import parse_run_config
from moerun.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo_corpus  # noqa: E402

HELDOUT_SEED = 2024  # training used seed 0, its own held-out evaluation seed 1
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
PLAIN_PROMPTS = ("hello", "What is the capital of France?", "Tell me about Millbrook.", "What is a river?",
                 "Why is the sky blue?", "What is the weather in Paris?", "Who is the baker in Millbrook?")


def cpu_engine(dtype: str = "float32") -> Engine:
    return Engine(parse_run_config({"backend": "cpu", "model": {"path": "builtin:demo", "dtype": dtype}}, ROOT))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return cpu_engine()


def generate(engine: Engine, conversations: list[tuple[list[dict], list | None]], max_tokens: int = 96) -> list[str]:
    """Greedy continuations of each (messages, tools), batched in one generate call."""
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(m, tools=t)) for m, t in conversations]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), stop_ids=tuple(tok.eos_token_ids))
    return [tok.decode(o) for o in outputs]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def split_answer(output: str) -> tuple[str, str]:
    """(reasoning, answer): the prompt ends in `<think>\\n`, so the output is reasoning, `</think>`, answer."""
    assert output.count("</think>") == 1, output
    reasoning, answer = output.split("</think>")
    return reasoning.strip(), answer.strip()


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text.lower())


def tool_calls(text: str) -> list[tuple[str, dict[str, str]]]:
    """M2's tool-call XML, parsed as the vLLM/SGLang minimax_m2 parsers read it (values stripped of one newline)."""
    calls = []
    for block in re.findall(r"<minimax:tool_call>(.*?)</minimax:tool_call>", text, re.S):
        for name, body in re.findall(r'<invoke name="([^"]+)">(.*?)</invoke>', block, re.S):
            args = {k: v.strip("\n") for k, v in re.findall(r'<parameter name="([^"]+)">(.*?)</parameter>', body, re.S)}
            calls.append((name, args))
    return calls


@pytest.fixture(scope="module")
def corpus_vocabulary() -> set[str]:
    return set(words("".join(demo_corpus.render_conversations(0, max_chars=400_000))))


# --- the shipped files ------------------------------------------------------------------------------------------

def test_shipped_files_match_their_manifest():
    folder = trained_demo.shipped_folder()
    manifest = json.loads((folder / demo.MANIFEST).read_text())
    assert manifest["version"] == trained_demo.VERSION
    assert set(manifest["files"]) == set(trained_demo.FILES)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*trained_demo.FILES, demo.MANIFEST])
    import hashlib

    for name, expected in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == expected["size"] and hashlib.sha256(data).hexdigest() == expected["sha256"], name
    assert trained_demo.trained_demo_folder() == folder


def test_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    import shutil

    from moerun.backends.errors import CheckpointError

    copy = tmp_path / "demo_model"
    shutil.copytree(trained_demo.shipped_folder(), copy)
    shard = copy / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(trained_demo, "shipped_folder", lambda: copy)
    with pytest.raises(CheckpointError, match="reinstall"):
        trained_demo.trained_demo_folder()


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
    ids = tok.encode(tok.apply_chat_template(user("What is the weather in Paris?"), tools=[WEATHER_TOOL]))
    with torch.no_grad():
        ref = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    ours = engine.logits(ids)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# --- what it learned --------------------------------------------------------------------------------------------

def test_heldout_loss_is_low(engine):
    """Mean next-token loss on the assistant turns of conversations training never saw, through moerun's logits.
    Uniform guessing over the vocabulary would be ln(2048) = 7.6 nats per token."""
    tok = engine.tokenizer
    total, count = 0.0, 0
    for text in demo_corpus.render_conversations(HELDOUT_SEED, count=12):
        # The assistant turns (what the model was trained to write) run from just after `]~b]ai\n` to `[e~[`; both
        # ends are token boundaries (a newline before, an added token at the end), so the pieces encode apart.
        cuts = [0]
        for m in re.finditer(re.escape("]~b]ai\n"), text):
            cuts += [m.end(), text.index("[e~[", m.end()) + len("[e~[")]
        cuts.append(len(text))
        ids, targets = [], []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            piece = tok.encode(text[a:b])
            ids += piece
            targets += [i % 2 == 1] * len(piece)
        assert ids == tok.encode(text)
        logp = engine.logits(ids).log_softmax(-1)
        positions = [i for i in range(1, len(ids)) if targets[i]]
        total -= sum(logp[i - 1, ids[i]].item() for i in positions)
        count += len(positions)
    assert total / count < 0.5, total / count


@pytest.fixture(scope="module")
def plain_answers(engine) -> dict[str, str]:
    return dict(zip(PLAIN_PROMPTS, generate(engine, [(user(p), None) for p in PLAIN_PROMPTS])))


def test_plain_prompts_get_fluent_english(plain_answers, corpus_vocabulary):
    for prompt, output in plain_answers.items():
        reasoning, answer = split_answer(output)
        found = words(answer)
        assert len(found) >= 4 and len(words(reasoning)) >= 4, (prompt, output)
        known = sum(w in corpus_vocabulary for w in found) / len(found)
        assert known >= 0.9, (prompt, output)
        assert answer[-1] in ".!?", (prompt, output)  # a finished sentence, not a cut-off ramble
        assert tool_calls(output) == [], (prompt, output)  # no tools were offered


def test_weather_tool_call_copies_the_city(engine):
    questions = {"What is the weather in Paris?": {"city": "Paris"},
                 "Is it raining in Tokyo?": {"city": "Tokyo"},
                 "What is the weather like in Buenos Aires today?": {"city": "Buenos Aires"},
                 "What is the weather in Oslo, in Fahrenheit?": {"city": "Oslo", "unit": "fahrenheit"}}
    outputs = generate(engine, [(user(q), [WEATHER_TOOL]) for q in questions])
    schema = WEATHER_TOOL["function"]["parameters"]
    for (question, expected), output in zip(questions.items(), outputs):
        calls = tool_calls(output)
        assert calls == [("get_weather", expected)], (question, output)
        args = calls[0][1]
        assert set(schema["required"]) <= set(args) <= set(schema["properties"])
        assert args.get("unit", "celsius") in schema["properties"]["unit"]["enum"]


def test_no_tool_call_when_the_question_needs_none(engine):
    outputs = generate(engine, [(user("hello"), [WEATHER_TOOL]), (user("What is a bridge?"), [WEATHER_TOOL])])
    for output in outputs:
        assert tool_calls(output) == [] and len(words(split_answer(output)[1])) >= 3, output


def test_answer_uses_the_tool_result(engine):
    result = {"city": "Paris", "temperature": 17, "unit": "celsius", "condition": "cloudy"}
    messages = user("What is the weather in Paris?") + [
        {"role": "assistant", "content": "", "reasoning_content": "I will call get_weather.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": json.dumps(result)}]
    _, answer = split_answer(generate(engine, [(messages, [WEATHER_TOOL])])[0])
    assert "Paris" in answer and "17" in answer and "cloudy" in answer, answer


def test_arithmetic_reasons_before_answering(engine):
    sums = {"What is 7 plus 5?": 12, "What is 9 times 3?": 27, "What is 20 minus 8?": 12}
    outputs = generate(engine, [(user(q), None) for q in sums])
    right = 0
    for (question, value), output in zip(sums.items(), outputs):
        reasoning, answer = split_answer(output)
        assert re.search(r"\d+ [-+*/] \d+ = \d+", reasoning), output  # worked out step by step first
        numbers = re.findall(r"\d+", answer)
        assert numbers, output
        right += int(numbers[-1]) == value
    assert right >= 2, outputs


# --- the demo through the CLI and other backends ----------------------------------------------------------------

def test_cli_generate_with_no_config_prints_english(capsys, corpus_vocabulary):
    assert main(["generate", "-p", "What is the weather in Paris?"]) == 0
    _, answer = split_answer(capsys.readouterr().out)
    found = words(answer)
    assert len(found) >= 8 and sum(w in corpus_vocabulary for w in found) >= 0.9 * len(found), answer


def test_cpu_and_emulated_ascend_agree_in_bf16(engine):
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template(user("What is the weather in Paris?"), tools=[WEATHER_TOOL]))
    cpu = cpu_engine("bfloat16").logits(ids)
    ascend = Engine(parse_run_config({"backend": "ascend", "model": {"path": "builtin:demo", "dtype": "bfloat16"},
                                      "kv_cache": {"block_size": 128, "num_blocks": 8},
                                      "ascend": {"emulate": True}}, ROOT)).logits(ids)
    report = compare_logits(cpu, ascend, Thresholds())
    assert report.passed, report.failures
