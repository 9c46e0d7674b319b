"""tools/train_demo.py and tools/demo_corpus.py stay runnable: a few training steps on a small slice write a
checkpoint in the shipped layout that moerun loads, and the same seed gives the same bytes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from moerun.runtime import demo, trained_demo
from moerun.runtime.engine import Engine
from moerun.runtime.run_config import parse_run_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo_corpus  # noqa: E402
import train_demo  # noqa: E402


def test_corpus_is_deterministic_and_seeded():
    first = list(demo_corpus.render_conversations(3, count=40))
    assert first == list(demo_corpus.render_conversations(3, count=40))
    assert first != list(demo_corpus.render_conversations(4, count=40))
    text = "".join(first)
    assert all(t.startswith(demo.BOS) and t.endswith(demo.EOS + "\n") for t in first)
    assert "<minimax:tool_call>\n<invoke name=" in text and "]~b]tool\n<response>" in text and "<think>\n" in text


def test_loss_covers_what_the_model_writes_after_the_last_question():
    text = next(t for t in demo_corpus.render_conversations(5, count=200) if "]~b]tool" in t and t.count("]~b]user") > 1)
    last_question = text.rindex("]~b]user\n")
    spans = train_demo.loss_spans(text)
    assert len(spans) == text.count("]~b]ai\n", last_question) == 2  # the tool call, the answer after its result
    for begin, end in spans:
        assert begin > last_question and text[:begin].endswith("]~b]ai\n") and text[:end].endswith(demo.EOS)
        assert not any(tag in text[begin:end] for tag in ("]~b]user", "]~b]tool", "]~b]system", "<response>"))
    assert "<minimax:tool_call>" in text[slice(*spans[0])] and text[spans[0][0]:].startswith("<think>\n")


def _hashes(folder: Path) -> dict:
    files = json.loads((folder / demo.MANIFEST).read_text())["files"]
    return {name: f["sha256"] for name, f in files.items() if name != "training.json"}  # it records the time taken


def test_a_few_training_steps_write_a_loadable_checkpoint(tmp_path):
    runs, settings = [], (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    for name in ("a", "b"):
        record = train_demo.train(tmp_path / name, train_demo.QUICK, log=lambda line: None)
        runs.append(tmp_path / name)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == settings  # left as it was
    assert demo.matches_manifest(runs[0], trained_demo.VERSION, trained_demo.FILES)
    assert _hashes(runs[0]) == _hashes(runs[1])  # seeded: the same settings give the same bytes
    assert math.isfinite(record["train_loss_last_50_steps"]) and math.isfinite(record["heldout_loss"][-1]["loss"])

    # The layout is the shipped one: the same config keys, dims and tensor names.
    made = json.loads((runs[0] / "config.json").read_text())
    shipped = json.loads((trained_demo.shipped_folder() / "config.json").read_text())
    assert set(made) == set(shipped)
    assert {k: made[k] for k in train_demo.DIMS} == {k: shipped[k] for k in train_demo.DIMS}
    index = json.loads((runs[0] / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(json.loads((trained_demo.shipped_folder() / "model.safetensors.index.json").read_text())["weight_map"])

    engine = Engine(parse_run_config({"backend": "cpu", "model": {"path": str(runs[0]), "dtype": "float32"}}, tmp_path))
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    assert tok.decode(ids, skip_special_tokens=False).startswith(demo.BOS + "]~b]system\n")
    assert torch.isfinite(engine.logits(ids)).all()
