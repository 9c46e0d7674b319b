"""The demo checkpoint: deterministic, atomic, and a checkpoint transformers itself loads as MiniMax-M2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moerun.runtime import demo
from moerun.backends.errors import MoerunError
from moerun.runtime.model_config import load_model_config
from moerun.runtime.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    # Every test gets its own cache, so nothing here ever touches the real user cache.
    root = tmp_path / "cache"
    monkeypatch.setenv("MOERUN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    demo.write_demo_checkpoint(folder)
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != demo.DEMO_VERSION)


# --- cache location -------------------------------------------------------------------------------------------

def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == tmp_path / "a"
    monkeypatch.delenv("MOERUN_CACHE")
    assert demo.cache_root() == tmp_path / "xdg" / "moerun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == tmp_path / "home" / ".cache" / "moerun"


# --- determinism ----------------------------------------------------------------------------------------------

def test_two_builds_are_byte_identical(cache, monkeypatch, tmp_path, built):
    first = demo.ensure_demo_checkpoint()
    assert first == cache / demo.DEMO_VERSION
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "other"))
    second = demo.ensure_demo_checkpoint()
    assert second != first
    assert hashes(first) == hashes(second) == hashes(built)
    assert set(hashes(first)) == set(demo.FILES) | {demo.MANIFEST}


# A cached demo folder is only checked against its own manifest, so code that changes the files must also bump
# DEMO_VERSION, or users keep a stale demo-v1. These hashes catch a forgotten bump. (Weights are left out: their
# bytes follow torch's RNG, which is not promised to be identical across torch versions.)
GOLDEN = {
    "demo-v1": {
        "tokenizer.json": "4589f434e6fb6d1f029538b4e407d379ae921a086a2e795e230ed316c6122f93",
        "tokenizer_config.json": "e1b80fad04b25dd15d0544eb3797ab42cb6cfb71056f1f4e26a8618216a28830",
        "chat_template.jinja": "06068664b7598668d85bac6ebe97021b6fd452b4269307302251f7fa1d216d94",
        "config.json": "d4432568bf2a309d3fd09255c8b1b3520967213a0d4aae5ab30b9e0b61f897cd",
        "generation_config.json": "69e2894f61553a0fbda95589988fb9cf494f46699c96b545fe72c3ddcedaa5ff",
    },
}


def test_text_files_match_their_version(built):
    expected = GOLDEN.get(demo.DEMO_VERSION)
    assert expected is not None, f"add the golden hashes of {demo.DEMO_VERSION}"
    actual = {name: digest for name, digest in hashes(built).items() if name in expected}
    assert actual == expected, "the demo files changed: bump DEMO_VERSION and record the new hashes here"


def test_tokenizer_does_not_depend_on_the_hash_seed():
    # Dict/set order changes with PYTHONHASHSEED; the learned merges must not.
    code = ("import hashlib; from moerun.runtime.demo import build_tokenizer_json; "
            "print(hashlib.sha256(build_tokenizer_json()[0].encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2")}
    assert digests == {hashlib.sha256(demo.build_tokenizer_json()[0].encode()).hexdigest()}


# --- atomicity ------------------------------------------------------------------------------------------------

def test_second_call_reuses_the_folder(cache):
    path = demo.ensure_demo_checkpoint()
    inode = (path / "config.json").stat().st_ino
    assert demo.ensure_demo_checkpoint() == path
    assert (path / "config.json").stat().st_ino == inode
    assert leftovers(cache) == []


def test_leftover_temp_build_is_ignored_and_old_ones_cleaned(cache, built):
    cache.mkdir()
    young = cache / f".{demo.DEMO_VERSION}.tmp-young"
    old = cache / f".{demo.DEMO_VERSION}.tmp-old"
    for partial in (young, old):
        partial.mkdir()
        (partial / "config.json").write_bytes((built / "config.json").read_bytes())
    os.utime(old, (0, 0))
    assert not demo.is_valid_demo(young)
    path = demo.ensure_demo_checkpoint()
    assert demo.is_valid_demo(path)
    assert young.exists(), "a young temp build may belong to a concurrent run"
    assert not old.exists()


@pytest.mark.parametrize("damage", ["delete_file", "truncate_shard", "no_manifest", "wrong_version"])
def test_damaged_folder_is_not_valid_and_is_rebuilt(cache, damage):
    path = demo.ensure_demo_checkpoint()
    good = hashes(path)
    if damage == "delete_file":
        (path / "tokenizer.json").unlink()
    elif damage == "truncate_shard":
        shard = path / demo.FILES[-1]
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "no_manifest":
        (path / demo.MANIFEST).unlink()
    else:
        manifest = json.loads((path / demo.MANIFEST).read_text())
        (path / demo.MANIFEST).write_text(json.dumps({**manifest, "version": "demo-v0"}))
    assert not demo.is_valid_demo(path)
    assert demo.ensure_demo_checkpoint() == path
    assert hashes(path) == good
    assert leftovers(cache) == []


def test_interrupted_build_leaves_nothing_that_looks_valid(cache, monkeypatch):
    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_checkpoint()
    assert not (cache / demo.DEMO_VERSION).exists()
    assert leftovers(cache) == []
    monkeypatch.undo()
    monkeypatch.setenv("MOERUN_CACHE", str(cache))
    assert demo.is_valid_demo(demo.ensure_demo_checkpoint())


def test_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MOERUN_CACHE", str(blocker / "cache"))
    with pytest.raises(MoerunError, match="MOERUN_CACHE") as e:
        demo.ensure_demo_checkpoint()
    assert "\n" not in str(e.value)


def test_losing_the_race_uses_the_winners_folder(cache, monkeypatch):
    real_write = demo.write_demo_checkpoint

    def write_and_lose(folder):
        real_write(folder)
        winner = cache / demo.DEMO_VERSION  # another process renames its build in first
        winner.mkdir()
        real_write(winner)

    monkeypatch.setattr(demo, "write_demo_checkpoint", write_and_lose)
    path = demo.ensure_demo_checkpoint()
    assert demo.is_valid_demo(path)
    assert leftovers(cache) == []


def test_concurrent_first_runs(cache):
    results, errors = [], []

    def run():
        try:
            results.append(demo.ensure_demo_checkpoint())
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {cache / demo.DEMO_VERSION}
    assert demo.is_valid_demo(results[0])
    assert leftovers(cache) == []


# --- contents -------------------------------------------------------------------------------------------------

def test_config_is_m2_format_and_parses(built):
    raw = json.loads((built / "config.json").read_text())
    assert raw["model_type"] == "minimax_m2" and raw["architectures"] == ["MiniMaxM2ForCausalLM"]
    assert raw["rotary_dim"] == 16 and raw["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert raw["num_attention_heads"] * raw["head_dim"] > raw["hidden_size"]  # q_proj wider than hidden, like M2
    cfg = load_model_config(built)
    tok = Tokenizer.from_folder(built)
    assert cfg.rotary_dim == 16 and cfg.head_dim == 32 and cfg.rope_theta == 5e6
    assert cfg.vocab_size % 64 == 0 and tok.vocab_size <= cfg.vocab_size < tok.vocab_size + 64
    assert cfg.bos_token_id == tok.token_to_id("]~!b[")
    assert cfg.eos_token_ids == (tok.token_to_id("[e~["),)
    assert cfg.checkpoint_dtype == "bfloat16"


def test_tensors_have_m2_names_and_dtypes(built):
    cfg = load_model_config(built)
    index = json.loads((built / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f for f in demo.FILES if f.endswith(".safetensors")]
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(built / file), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        expected |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                     "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                     "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                     "block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias")}
        expected |= {f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.num_experts)
                     for w in ("w1", "w2", "w3")}
    assert set(tensors) == expected

    for name, t in tensors.items():
        router = "gate.weight" in name or "e_score_correction_bias" in name
        assert t.dtype == (torch.float32 if router else torch.bfloat16), name
    p = "model.layers.0."
    assert tensors[p + "self_attn.q_proj.weight"].shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    assert tensors[p + "self_attn.q_norm.weight"].shape == (cfg.num_heads * cfg.head_dim,)
    assert tensors[p + "self_attn.k_norm.weight"].shape == (cfg.num_kv_heads * cfg.head_dim,)
    assert tensors[p + "block_sparse_moe.experts.0.w2.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)
    assert tensors[p + "block_sparse_moe.e_score_correction_bias"].abs().min() > 0


def test_transformers_loads_it_and_logits_are_not_flat(built):
    from transformers import MiniMaxM2ForCausalLM

    model, info = MiniMaxM2ForCausalLM.from_pretrained(built, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5  # partial RoPE survived the load
    bias = model.model.layers[0].mlp.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().min() > 0

    tok = Tokenizer.from_folder(built)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}]))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
    probs = logits.softmax(-1)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1.0  # peaked, not uniform
    assert probs.max() < 0.99  # and not one-hot either


def test_builtin_random_demo_names_this_checkpoint(cache):
    """`model.path: builtin:random-demo` in a config is the checkpoint built here (the trained demo is builtin:demo)."""
    from moerun.runtime.engine import resolve_model_folder
    from moerun.runtime.run_config import parse_run_config

    run = parse_run_config({"backend": "cpu", "model": {"path": "builtin:random-demo"}}, Path("."))
    assert resolve_model_folder(run.model_path) == demo.ensure_demo_checkpoint()
