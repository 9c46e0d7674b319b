"""`moerun quantize --w8a8`: every written tensor against an independent numpy re-quantization of the source, the
description, index, shards and side files as msModelSlim lays them out, and the promises about bad input and
interrupted runs (one line, exit 2; nothing half-written, also on SIGINT and SIGTERM)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fp8_checkpoints import dequantize_numpy, make_fp8_pair
from safetensors import safe_open
from w8a8_checkpoints import numpy_quantize, quantize

from moerun.runtime import shard_writer
from moerun.runtime.cli import main

QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$")
SHARD = re.compile(r"^quant_model_weights-(\d{5})-of-(\d{5})\.safetensors$")


def read_folder(folder, pattern="*.safetensors"):
    tensors, files = {}, {}
    for path in sorted(folder.glob(pattern)):
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                assert k not in tensors, f"{k} stored twice"
                tensors[k], files[k] = f.get_tensor(k), path.name
    return tensors, files


def check_quantized(out, name, source_float):
    q, scale = numpy_quantize(source_float.numpy())
    module = name.removesuffix("weight")
    assert out[name].dtype == torch.int8 and np.array_equal(out[name].numpy(), q), name
    assert out[module + "weight_scale"].dtype == torch.float32 and out[module + "weight_scale"].shape == (len(q), 1)
    assert np.array_equal(out[module + "weight_scale"].numpy()[:, 0], scale), name
    assert not out[module + "weight_offset"].any() and out[module + "weight_offset"].shape == (len(q), 1)


def test_bf16_checkpoint_quantized_tensor_by_tensor(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("gqa4_half_rope", torch.bfloat16, 3)
    dst = quantize(src, tmp_path / "w8a8", max_shard_size="60KB")
    source, _ = read_folder(src)
    out, files = read_folder(dst)
    description = json.loads((dst / "quant_model_description.json").read_text())
    assert {k: description.pop(k) for k in ("version", "model_quant_type", "group_size", "metadata", "optional")} == {
        "version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "group_size": 0, "metadata": {}, "optional": {}}
    assert set(description) == set(out)  # every stored tensor described, nothing else
    for name, tensor in source.items():
        if QUANTIZED.search(name):
            check_quantized(out, name, tensor.float())
            assert description[name] == "W8A8_DYNAMIC"
            assert description[name.replace(".weight", ".weight_scale")] == "W8A8_DYNAMIC"
        else:  # router (fp32), bias (fp32), norms, embeddings and lm_head (bf16): as stored
            assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
            assert description[name] == "FLOAT"
    assert len(out) == len(source) + 2 * sum(bool(QUANTIZED.search(n)) for n in source)

    index = json.loads((dst / "quant_model_weights.safetensors.index.json").read_text())
    assert index["weight_map"] == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    shards = sorted({SHARD.match(f).groups() for f in files.values()})
    assert len(shards) > 1 and [int(i) for i, _ in shards] == list(range(1, len(shards) + 1))
    assert {n for _, n in shards} == {f"{len(shards):05d}"}
    for shard in set(files.values()):  # at most 60 KB of tensors each, unless one tensor alone is larger
        held = [out[k] for k, f in files.items() if f == shard]
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held) <= 60_000

    source_config = json.loads((src / "config.json").read_text())
    assert json.loads((dst / "config.json").read_text()) == source_config
    assert (dst / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    assert not list(dst.glob("model*.safetensors*"))


def test_fp8_checkpoint_is_dequantized_then_quantized(hf_checkpoint, tmp_path):
    float_folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(float_folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    dst = quantize(tmp_path / "fp8", tmp_path / "w8a8")
    fp8, _ = read_folder(tmp_path / "fp8")
    out, _ = read_folder(dst)
    for name, tensor in fp8.items():
        if QUANTIZED.search(name):
            check_quantized(out, name, dequantize_numpy(tensor, fp8[name + "_scale_inv"], (16, 16)))
    assert not any(n.endswith("weight_scale_inv") for n in out)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())


def run(args, capsys):
    code = main(["quantize", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_writes_nothing(hf_checkpoint, tmp_path, capsys):
    src, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    w8a8 = quantize(src, tmp_path / "w8a8")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    cases = [
        (["--w8a8", src, tmp_path / "full"], "exists and is not empty"),
        (["--w8a8", src, tmp_path / "file"], "not a folder"),
        (["--w8a8", src, tmp_path / "no" / "dst"], "does not exist"),
        (["--w8a8", tmp_path / "missing", tmp_path / "dst"], "checkpoint folder not found"),
        (["--w8a8", w8a8, tmp_path / "dst"], "already a W8A8 checkpoint"),
        (["--w8a8", "--max-shard-size", "lots", src, tmp_path / "dst"], "--max-shard-size: expected"),
        ([src, tmp_path / "dst"], "choose the output format: --w8a8"),
    ]
    for args, message in cases:
        code, err = run(args, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DST, no staging folder
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_an_empty_destination_folder_is_filled(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    (tmp_path / "empty").mkdir()
    assert (quantize(src, tmp_path / "empty") / "quant_model_description.json").is_file()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")], ids=["ctrl-c", "disk"])
def test_a_failure_mid_write_leaves_nothing(failure, hf_checkpoint, tmp_path, monkeypatch, capsys):
    src, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    written = []
    original = shard_writer.ShardWriter.write

    def write(self, name, tensor):
        if len(written) == 20:
            raise failure
        written.append(name)
        original(self, name, tensor)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", write)
    code, err = run(["--w8a8", "--max-shard-size", "20KB", src, tmp_path / "dst"], capsys)
    assert (code, err.splitlines()[-1]) in [(130, "moerun: interrupted"),
                                            (2, f"moerun: error: {tmp_path / 'dst'}: cannot write the W8A8 checkpoint "
                                                f"(No space left on device)")]
    assert len(written) == 20 and list(tmp_path.iterdir()) == []


def test_sigint_and_sigterm_leave_nothing(hf_checkpoint, tmp_path):
    """Real signals, delivered to the converting process itself after its 30th tensor."""
    src, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    script = textwrap.dedent(f"""
        import os, signal
        from moerun.runtime.w8a8_quantize import quantize_w8a8
        for sig, name in ((signal.SIGINT, "int"), (signal.SIGTERM, "term")):
            def progress(done, total, sig=sig):
                if done == 30:
                    os.kill(os.getpid(), sig)
            try:
                quantize_w8a8({str(src)!r}, {str(tmp_path)!r} + "/" + name, 20_000, progress)
            except KeyboardInterrupt:
                print("interrupted", name)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["interrupted", "int", "interrupted", "term"], result.stderr
    assert list(tmp_path.iterdir()) == []
