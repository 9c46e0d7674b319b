"""Every bad input is one line on stderr naming what is wrong, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from bad_input import assert_one_line, run_cli
from conftest import run_yaml


@pytest.fixture
def good(hf_checkpoint, tmp_path):
    """A private copy of a good checkpoint that a test may break."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    return copy


def _logits(cfg, out, ids="1,2,3"):
    return ["logits", "-c", str(cfg), "--token-ids", ids, "--out", str(out)]


def test_missing_checkpoint_folder(write_yaml, tmp_path, capsys):
    cfg = write_yaml(run_yaml(tmp_path / "nowhere"))
    assert_one_line(*run_cli(_logits(cfg, tmp_path / "o.npy"), capsys), "nowhere")
    assert not (tmp_path / "o.npy").exists()


def test_config_of_another_model_type(good, write_yaml, tmp_path, capsys):
    cfg = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert_one_line(*run_cli(_logits(write_yaml(run_yaml(good)), tmp_path / "o.npy"), capsys),
                     "model_type 'llama' is not supported")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_truncated_or_corrupt_safetensors(damage, good, write_yaml, tmp_path, capsys):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    assert_one_line(*run_cli(_logits(write_yaml(run_yaml(good)), tmp_path / "o.npy"), capsys), "model.safetensors")
    assert not (tmp_path / "o.npy").exists()


def test_unknown_dtype(good, write_yaml, tmp_path, capsys):
    assert_one_line(*run_cli(_logits(write_yaml(run_yaml(good, dtype="float8")), tmp_path / "o.npy"), capsys),
                     "model.dtype: 'float8' is not allowed (allowed: float32, bfloat16, float16, float64)")


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(modle=d.pop("model")), "modle: unknown key"),
    (lambda d: d["model"].update(dtpye="float32"), "model.dtpye: unknown key"),
    (lambda d: d["kv_cache"].update(num_blocks="many"), "kv_cache.num_blocks: expected int"),
    (lambda d: d.update(backend="tpu"), "backend: unknown backend 'tpu' (allowed: ascend, cpu, cuda)"),
    (lambda d: d.update(cpu={"thread": 2}), "cpu.thread: unknown key (allowed: threads, weights)"),
    (lambda d: d["kv_cache"].update(block_size=7), "kv_cache.block_size: 7 is not supported by backend cpu"),
], ids=["top_key", "model_key", "wrong_type", "backend", "backend_section", "block_size"])
def test_yaml_typos(mutate, message, good, write_yaml, tmp_path, capsys):
    data = run_yaml(good)
    mutate(data)
    assert_one_line(*run_cli(_logits(write_yaml(data), tmp_path / "o.npy"), capsys), message)


def test_yaml_syntax_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("backend: cpu\nmodel: [unclosed\n")
    assert_one_line(*run_cli(_logits(cfg, tmp_path / "o.npy"), capsys), "not valid YAML")


def test_token_ids_outside_vocabulary(good, write_yaml, tmp_path, capsys):
    assert_one_line(*run_cli(_logits(write_yaml(run_yaml(good)), tmp_path / "o.npy", ids="1,2,211"), capsys),
                     "token id 211 at position 2 is outside the vocabulary (allowed: 0..210)")
    assert_one_line(*run_cli(_logits(write_yaml(run_yaml(good)), tmp_path / "o.npy", ids="1,x"), capsys),
                     "--token-ids: expected comma-separated integers")
    assert not (tmp_path / "o.npy").exists()


def test_mis_shaped_and_unexpected_tensors_name_tensor_and_file(good, write_yaml, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_norm.weight"] = torch.ones(7)
    tensors["model.layers.0.extra.weight"] = torch.ones(3)
    save_file(tensors, str(good / "model.safetensors"), metadata={"format": "pt"})
    code, errors, err = run_cli(_logits(write_yaml(run_yaml(good)), tmp_path / "o.npy"), capsys)
    assert_one_line(code, errors, err, "model.layers.0.extra.weight: unexpected tensor in model.safetensors (and 1 more)")


def test_mtp_layers_are_ignored_and_layer_cut_works(good, write_yaml):
    from safetensors.torch import load_file, save_file

    from moerun.runtime.engine import Engine

    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.2.enorm.weight"] = torch.ones(64)  # an MTP module beyond num_hidden_layers
    save_file(tensors, str(good / "model.safetensors"), metadata={"format": "pt"})
    assert Engine.from_config(write_yaml(run_yaml(good))).model.num_layers == 2
    assert Engine.from_config(write_yaml(run_yaml(good)), num_layers=1).model.num_layers == 1


def test_unknown_command_line_option_is_one_line(capsys):
    code, errors, err = run_cli(["logits", "--nope"], capsys)
    assert code == 2 and len(errors) == 1 and "--nope" in errors[0]


def test_debug_shows_the_traceback(tmp_path, write_yaml):
    cfg = write_yaml(run_yaml(tmp_path / "nowhere"))
    proc = subprocess.run([sys.executable, "-m", "moerun", "logits", "-c", str(cfg), "--token-ids", "1",
                           "--out", str(tmp_path / "o.npy"), "--debug"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "moerun", "logits", "-c", str(cfg), "--token-ids", "1",
                           "--out", str(tmp_path / "o.npy")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("moerun: error:")] == [
        f"moerun: error: {tmp_path / 'nowhere'}: checkpoint folder not found (model.path must be an HF checkpoint folder)"]
