"""Bad files, one line each (issue 7's examples and their classes): the YAML config, config.json, the shard index
and the safetensors shards. Each case is run through the CLI and held to the promise (tests/bad_input.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
import yaml
from bad_input import assert_one_line, assert_promise, hang_guard, run_cli
from conftest import run_yaml

from moerun.runtime import loader, memory


@pytest.fixture
def good(hf_checkpoint, tmp_path):
    """A private copy of a good checkpoint that a test may break (2 layers, vocab 211, 512 positions)."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32, seed=5, max_shard_size="40KB")  # as test_hf_parity
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    return copy


def logits_argv(cfg, tmp_path, ids="1,2,3"):
    return ["logits", "-c", cfg, "--token-ids", ids, "--out", tmp_path / "o.npy"]


def run_config_text(text: str | bytes, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    (cfg.write_bytes if isinstance(text, bytes) else cfg.write_text)(text)
    result = run_cli(logits_argv(cfg, tmp_path), capsys)
    assert not (tmp_path / "o.npy").exists()
    return result


# ---- YAML ----------------------------------------------------------------------------------------------------

def test_yaml_that_is_not_utf8(tmp_path, capsys):
    assert_one_line(*run_config_text(b"backend: cpu\nmodel: {path: caf\xe9}\n", tmp_path, capsys),
                    "not UTF-8 text (byte 0xe9 at offset 30)")


def test_deeply_nested_yaml(tmp_path, capsys):
    assert_one_line(*run_config_text("backend: " + "[" * 5000 + "]" * 5000, tmp_path, capsys),
                    "nested deeper than 16 levels")


def test_yaml_larger_than_the_cap(tmp_path, capsys):
    assert_one_line(*run_config_text("backend: cpu\n#" + "x" * 70000, tmp_path, capsys),
                    "larger than 64 KiB, the most a config file may be")


@pytest.mark.parametrize("where", ["top", "dtype"])
def test_yaml_alias_bomb_is_refused_before_it_expands(where, good, tmp_path, capsys):
    # Nine levels of nine aliases: 9**9 = 387M strings once expanded (12 GB, and a 2 GB line when echoed).
    bomb = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    target = "backend: *a8\n" if where == "top" else f"backend: cpu\nmodel: {{path: {good}, dtype: *a8}}\n"
    code, errors, err = run_config_text(bomb + target, tmp_path, capsys)
    assert_one_line(code, errors, err, "alias *a0: YAML aliases are not allowed in a moerun config")
    assert len(errors[0]) < 1100


def test_repeated_yaml_key_is_refused_not_silently_overwritten(good, tmp_path, capsys):
    text = yaml.safe_dump(run_yaml(good)) + "backend: cuda\n"
    assert_one_line(*run_config_text(text, tmp_path, capsys), "key 'backend' appears twice in one mapping")


@pytest.mark.parametrize("value,message", [
    (-1, "cpu.threads: -1 is out of range (allowed: 0.."),
    (5000, "cpu.threads: 5000 is out of range (allowed: 0.."),
    (True, "cpu.threads: expected int, got True"),
])
def test_cpu_threads_range(value, message, good, write_yaml, tmp_path, capsys):
    assert_one_line(*run_cli(logits_argv(write_yaml(run_yaml(good, cpu={"threads": value})), tmp_path), capsys),
                    message)


@pytest.mark.parametrize("section,value,message", [
    ("kv_cache", {"num_blocks": 10**30}, "kv_cache.num_blocks: 1000000000000000000000000000000 is out of range (allowed: 1..16777216)"),
    ("kv_cache", {"num_blocks": 0}, "kv_cache.num_blocks: 0 is out of range"),
    ("model", {"num_layers": -3}, "model.num_layers: -3 is out of range (allowed: 1..4096)"),
    ("cuda", {"graph_max_batch": 10**6}, "cuda.graph_max_batch: 1000000 is out of range (allowed: 1..4096)"),
    ("ascend", {"device": "gpu:0"}, "ascend.device: expected 'npu' or 'npu:N', got 'gpu:0'"),
])
def test_yaml_ranges(section, value, message, good, write_yaml, tmp_path, capsys):
    data = run_yaml(good)
    data[section] = {**data.get(section, {}), **value}
    assert_one_line(*run_cli(logits_argv(write_yaml(data), tmp_path), capsys), message)


def test_kv_cache_too_big_for_memory_is_refused_before_any_weight_loads(good, write_yaml, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "host_memory_available", lambda: 1 << 30)
    monkeypatch.setattr(loader.WeightLoader, "load", lambda *a: pytest.fail("weights loaded before the memory check"))
    blocks = 300_000
    # K and V, 2 layers, 16 tokens per block, 2 KV heads of 16 dims, float32: written out here, not from limits.
    need = 2 * 2 * blocks * 16 * 2 * 16 * 4
    data = run_yaml(good)
    data["kv_cache"]["num_blocks"] = blocks
    code, errors, err = run_cli(logits_argv(write_yaml(data), tmp_path), capsys)
    assert_one_line(code, errors, err, f"kv_cache: {blocks} blocks of 16 tokens need {need / (1 << 30):.2f} GiB beside")
    assert "but 1.00 GiB is available on cpu; set kv_cache.num_blocks to at most" in errors[0]


def test_config_path_that_is_not_a_regular_file(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.yaml")
    with hang_guard():
        assert_one_line(*run_cli(logits_argv(tmp_path / "fifo.yaml", tmp_path), capsys),
                        "is a FIFO; a config file must be a regular file")
    assert_one_line(*run_cli(logits_argv(tmp_path, tmp_path), capsys), "is a directory; a config file must be a regular file")
    assert_one_line(*run_cli(logits_argv("/dev/zero", tmp_path), capsys), "is a character device")


# ---- config.json -----------------------------------------------------------------------------------------------

def edit_config(folder, **fields):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def run_checkpoint(folder, write_yaml, tmp_path, capsys, **sections):
    return run_cli(logits_argv(write_yaml(run_yaml(folder, **sections)), tmp_path), capsys)


def test_config_json_that_is_a_list(good, write_yaml, tmp_path, capsys):
    (good / "config.json").write_text("[1, 2]")
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), "expected a JSON object {...}, got a JSON array")


@pytest.mark.parametrize("fields,message", [
    ({"head_dim": "32"}, "'head_dim' must be an integer in 1..1024, got '32'"),
    ({"rope_theta": "abc"}, "'rope_theta' must be a finite number in (0, 1e+30], got 'abc'"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than num_local_experts 8 (allowed: 1..8)"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a finite number in (0, 1), got -1"),
    ({"num_key_value_heads": 3}, "num_attention_heads 8 is not a multiple of num_key_value_heads 3"),
    ({"rotary_dim": 18}, "rotary_dim 18 disagrees with partial_rotary_factor 0.5 x head_dim 16"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be an integer in 1..16777216, got 0"),
    ({"vocab_size": -5}, "'vocab_size' must be an integer in 1..16777216, got -5"),
    ({"eos_token_id": 211}, "'eos_token_id' must be a token id in 0..210, a list of them, or null, got 211"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false, got 'false'"),
    ({"hidden_size": None}, "missing 'hidden_size'"),
])
def test_config_json_fields_are_typed_and_related(fields, message, good, write_yaml, tmp_path, capsys):
    edit_config(good, **fields)
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), message)


def test_config_json_repeated_key_or_nan(good, write_yaml, tmp_path, capsys):
    text = (good / "config.json").read_text().rstrip().rstrip("}")
    (good / "config.json").write_text(text + ', "hidden_size": 64}')
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), "key 'hidden_size' appears twice")
    (good / "config.json").write_text(text + ', "extra": 1}')
    edit_config(good, rms_norm_eps=float("nan"))
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), "'rms_norm_eps' must be a finite number")


def test_missing_quantization_fields_take_the_release_values(hf_checkpoint, write_yaml, tmp_path):
    """A release-style FP8 checkpoint (128x128 blocks) whose quantization_config lost weight_block_size and
    modules_to_not_convert loads as the release does, giving the logits of its dequantized weights."""
    from fp8_checkpoints import make_fp8_pair
    from hf_checkpoints import hf_logits
    from transformers import MiniMaxM2ForCausalLM

    from moerun.runtime.engine import Engine

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (128, 128))
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    tokens = [3, 9, 27, 81, 5, 210]
    ours = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8"))).logits(tokens)
    ref = hf_logits(MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32), tokens)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---- the shard index and the shards ----------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


def retarget_index(folder, name: str) -> str:
    """Point the index's entries for the first shard at `name`; returns that shard's file name."""
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return first


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shard_names_that_leave_the_folder_are_refused(kind, good, write_yaml, tmp_path, capsys):
    # A *valid* shard outside the folder: the containment rule alone must refuse it.
    first = sorted(set(json.loads((good / INDEX).read_text())["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(good / first, outside)
    if kind == "symlink":
        (good / first).unlink()
        os.symlink(outside, good / first)
        message = "outside the checkpoint folder"
    else:
        retarget_index(good, "../outside.safetensors" if kind == "dotdot" else str(outside))
        message = "is not a file name inside the checkpoint folder"
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), message)


def test_the_etc_passwd_shard_name(good, write_yaml, tmp_path, capsys):
    retarget_index(good, "../../../../../../../../etc/passwd")
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys),
                    "shard '../../../../../../../../etc/passwd' listed in model.safetensors.index.json is not a file "
                    "name inside the checkpoint folder")


def test_hub_cache_symlinks_into_blobs_are_allowed(good, write_yaml, tmp_path, capsys):
    repo = tmp_path / "models--org--m"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in good.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        os.symlink(f"../../blobs/{f.name}", snapshot / f.name)
    code, errors, err = run_checkpoint(snapshot, write_yaml, tmp_path, capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_shards_that_are_not_regular_files(kind, good, write_yaml, tmp_path, capsys):
    first = sorted(set(json.loads((good / INDEX).read_text())["weight_map"].values()))[0]
    (good / first).unlink()
    if kind == "fifo":
        os.mkfifo(good / first)
    elif kind == "directory":
        (good / first).mkdir()
    else:
        os.symlink("/dev/zero", good / "zero")
        retarget_index(good, "zero")
    message = {"fifo": "is a FIFO; a safetensors shard must be a regular file",
               "directory": "is a directory; a safetensors shard must be a regular file",
               "device": "a symlink to '/dev/zero', outside the checkpoint folder"}[kind]
    with hang_guard():
        assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), message)


def first_shard_header(folder):
    """(path, header, data) of the shard holding the most tensors."""
    shards = list(json.loads((folder / INDEX).read_text())["weight_map"].values())
    first = max(sorted(set(shards)), key=shards.count)
    data = (folder / first).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return folder / first, json.loads(data[8:8 + n]), data[8 + n:]


def write_shard(path, header, body, declared: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + body)


@pytest.mark.parametrize("damage,message", [
    ("huge_length", "declares a 18446744073709551615-byte header"),
    ("length_past_end", "the file has"),
    ("overlap", "invalid offset for tensor"),
    ("out_of_range", "not a readable safetensors file"),
    ("shape_overflow", "overflow computing buffer size"),
])
def test_corrupt_safetensors_headers(damage, message, good, write_yaml, tmp_path, capsys):
    path, header, body = first_shard_header(good)
    names = [k for k in header if k != "__metadata__"]
    declared = None
    if damage == "huge_length":
        declared = 2**64 - 1
    elif damage == "length_past_end":
        declared = len(json.dumps(header)) + len(body) + 1
    elif damage == "overlap":
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    elif damage == "out_of_range":
        header[names[0]]["data_offsets"][1] += 1 << 30
    else:
        header[names[0]]["shape"] = [2**40, 2**40]
    write_shard(path, header, body, declared)
    assert_one_line(*run_checkpoint(good, write_yaml, tmp_path, capsys), message)


def test_smoke_on_a_broken_checkpoint_is_one_line(good, write_yaml, tmp_path, capsys):
    path, header, body = first_shard_header(good)
    path.write_bytes(path.read_bytes()[:-64])
    code, errors, err = run_cli(["smoke", "-c", write_yaml(run_yaml(good))], capsys)
    assert_promise(code, errors, err, allowed=(1, 2))
