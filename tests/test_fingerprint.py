"""`moerun fingerprint`: manifests of a sharded FP8 checkpoint, what --check names when tensors or files change,
the digest's definition and stability, streaming under a memory limit, and reference probes."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fp8_checkpoints import make_fp8_pair, shard_checkpoint
from safetensors.torch import load_file, save_file

from moerun.runtime.cli import main
from moerun.runtime.fingerprint import fingerprint

TEMPLATE = "{% for m in messages %}]~b]{{ m.role }}\n{{ m.content }}[e~[\n{% endfor %}"


@pytest.fixture(scope="module")
def fp8_sharded(tmp_path_factory, hf_checkpoint) -> Path:
    """A transformers-saved model turned into an FP8 block checkpoint in 3 shards with an index, plus tokenizer
    files and a chat template (their contents only need to be hashed)."""
    float_folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    root = tmp_path_factory.mktemp("fp8")
    make_fp8_pair(float_folder, root / "fp8", root / "ref", (16, 16))
    folder = root / "fp8"
    shard_checkpoint(folder, 3)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "]~!b[", "eos_token": "[e~["}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    shutil.copy(float_folder / "generation_config.json", folder)
    return folder


@pytest.fixture
def checkpoint(fp8_sharded, tmp_path) -> Path:
    """A private copy, free to damage."""
    return Path(shutil.copytree(fp8_sharded, tmp_path / "ckpt"))


def _write_manifest(folder: Path, out: Path, capsys) -> dict:
    assert main(["fingerprint", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def _check(folder: Path, manifest: Path, capsys) -> tuple[int, list[str]]:
    code = main(["fingerprint", "--check", str(folder), str(manifest)])
    return code, capsys.readouterr().out.splitlines()


def _data_span(shard: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of a tensor in a safetensors file, read from the format itself (8-byte length, JSON)."""
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_manifest_hashes_each_tensors_stored_bytes(checkpoint, tmp_path, capsys):
    manifest = _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    tensors = {}
    for shard in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    assert manifest["tensors"].keys() == tensors.keys() and len(tensors) > 40
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    assert manifest["tensors"][name]["dtype"] == "F8_E4M3"
    for key in (name, name + "_scale_inv", "model.embed_tokens.weight"):
        stored = tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
        assert manifest["tensors"][key] == {"dtype": manifest["tensors"][key]["dtype"], "shape": list(tensors[key].shape),
                                            "sha256": hashlib.sha256(stored).hexdigest()}
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert manifest["files"][file] == hashlib.sha256((checkpoint / file).read_bytes()).hexdigest()
    assert manifest["chat_template"] == {"source": "chat_template.jinja", "sha256": hashlib.sha256(TEMPLATE.encode()).hexdigest()}
    assert _check(checkpoint, tmp_path / "m.json", capsys)[0] == 0


def test_digest_follows_its_documented_definition(checkpoint, tmp_path, capsys):
    """docs/fidelity.md: sha256 over lines of compact JSON arrays (format, files, chat template, tensors by name)."""
    m = _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    lines = [["moerun-fingerprint/1"]]
    lines += [["file", name, sha] for name, sha in sorted(m["files"].items())]
    lines += [["chat_template", m["chat_template"]["sha256"]]]
    lines += [["tensor", name, t["dtype"], t["shape"], t["sha256"]] for name, t in sorted(m["tensors"].items())]
    text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    assert m["digest"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_digest_is_stable_across_runs_thread_counts_and_sharding(checkpoint, tmp_path):
    digests = {fingerprint(checkpoint, threads=t).digest for t in (1, 3, 8)}
    digests.add(fingerprint(checkpoint, threads=2).digest)
    resharded = tmp_path / "one_file"
    shutil.copytree(checkpoint, resharded, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for shard in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    save_file(tensors, str(resharded / "model.safetensors"), metadata={"format": "pt", "other": "metadata"})
    digests.add(fingerprint(resharded).digest)
    assert len(digests) == 1


def test_check_names_the_one_changed_tensor_of_a_sharded_fp8_checkpoint(checkpoint, tmp_path, capsys):
    _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    name = "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    shard = _shard_of(checkpoint, name)
    begin, end = _data_span(shard, name)
    with open(shard, "r+b") as f:  # one byte in the middle of that tensor
        f.seek((begin + end) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    code, out = _check(checkpoint, tmp_path / "m.json", capsys)
    assert code == 1
    assert out[0] == f"tensor {name}: bytes differ" and out[1].startswith("FAIL: 1 difference ")


def test_check_names_changed_tokenizer_and_template_files(checkpoint, tmp_path, capsys):
    _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"}}')
    (checkpoint / "chat_template.jinja").write_text(TEMPLATE.replace("{{ m.role }}\n", "{{ m.role }}\n\n"))
    code, out = _check(checkpoint, tmp_path / "m.json", capsys)
    assert code == 1
    assert out[:3] == ["file chat_template.jinja: bytes differ", "file tokenizer.json: bytes differ",
                       "chat template: differs (in chat_template.jinja)"]


def test_check_names_missing_extra_and_retyped_tensors(checkpoint, tmp_path, capsys):
    _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    gone = "model.layers.0.self_attn.k_norm.weight"
    shard = _shard_of(checkpoint, gone)
    tensors = load_file(str(shard))
    del tensors[gone]
    tensors["model.layers.0.extra.weight"] = torch.ones(4)
    retyped = next(n for n in sorted(tensors) if n.endswith("norm.weight"))
    tensors[retyped] = tensors[retyped].to(torch.bfloat16)
    reshaped = next(n for n in sorted(tensors) if tensors[n].dim() == 2 and tensors[n].shape[0] != tensors[n].shape[1])
    rows, cols = tensors[reshaped].shape
    tensors[reshaped] = tensors[reshaped].reshape(cols, rows)  # the same bytes, read as another shape
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (checkpoint / "model.safetensors.index.json").unlink()  # the index would refuse the change itself
    code, out = _check(checkpoint, tmp_path / "m.json", capsys)
    assert code == 1
    assert f"tensor {gone}: missing (in the manifest, not in the checkpoint)" in out
    assert "tensor model.layers.0.extra.weight: extra (in the checkpoint, not in the manifest)" in out
    assert f"tensor {reshaped}: shape [{cols}, {rows}] (manifest [{rows}, {cols}])" in out  # bytes alike: not named
    assert f"tensor {retyped}: dtype BF16 (manifest F32), bytes differ" in out


def test_bad_inputs_are_one_line_before_any_hashing(checkpoint, tmp_path, capsys, write_yaml, monkeypatch):
    from moerun.runtime.commands import fingerprint as command

    monkeypatch.setattr(command, "fingerprint_folder", lambda *a, **k: pytest.fail("hashed despite bad input"))
    same = write_yaml({"backend": "cpu", "model": {"path": str(checkpoint), "dtype": "float32"}}, "same.yaml")
    cases = [
        (["fingerprint", str(checkpoint), "--out", str(tmp_path / "nowhere" / "m.json")], "folder"),
        (["fingerprint", str(checkpoint), "--out", str(tmp_path)], "--out"),
        (["fingerprint", str(tmp_path / "none"), "--out", str(tmp_path / "m.json")], "not found"),
        (["fingerprint", str(checkpoint)], "--out"),
        (["fingerprint", str(checkpoint), "--out", str(tmp_path / "m.json"), "--probes-config",
          str(write_yaml({"backend": "cpu", "model": {"path": "builtin:demo"}}))], "not the fingerprinted"),
        (["fingerprint", str(checkpoint), "--out", str(tmp_path / "m.json"), "--floor-config", str(same)],
         "--floor-config needs"),
        (["fingerprint", str(checkpoint), "--out", str(tmp_path / "m.json"), "--probes-config", str(same),
          "--floor-config", str(same)], "the probes configuration itself"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (argv, err)
    assert not (tmp_path / "m.json").exists()


def test_an_edited_manifest_is_refused(checkpoint, tmp_path, capsys):
    m = _write_manifest(checkpoint, tmp_path / "m.json", capsys)
    m["tensors"]["model.norm.weight"]["sha256"] = "0" * 64
    (tmp_path / "m.json").write_text(json.dumps(m))
    assert main(["fingerprint", "--check", str(checkpoint), str(tmp_path / "m.json")]) == 2
    assert "digest does not match its entries" in capsys.readouterr().err


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A safetensors file of zeros written as a sparse file: header by hand, data by truncate (no RAM, no disk)."""
    offsets, start = {}, 0
    for name, (dtype, shape, itemsize) in tensors.items():
        size = itemsize
        for d in shape:
            size *= d
        offsets[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        start += size
    header = json.dumps(offsets).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + start)


def test_fingerprinting_streams_under_a_memory_limit_below_the_checkpoint_size(tmp_path):
    """The address space left after imports is 96 MB, under a quarter of the 400 MB checkpoint: reading one shard whole
    fails there, and fingerprinting all of it succeeds."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in range(2):
        _sparse_safetensors(folder / f"model-{i + 1:05d}-of-00002.safetensors",
                            {f"layer{i}.a": ("BF16", [6144, 8192], 2), f"layer{i}.b": ("F8_E4M3", [8192, 12288], 1)})
    budget = 96 << 20
    script = textwrap.dedent(f"""
        import resource, sys
        from moerun.runtime.cli import main
        import moerun.runtime.commands.fingerprint  # everything imported before the limit is set
        used = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + {budget}, used + {budget}))
        try:
            open({str(folder / "model-00001-of-00002.safetensors")!r}, "rb").read()
            print("READ WHOLE SHARD")
        except MemoryError:
            print("whole shard does not fit")
        sys.exit(main(["fingerprint", {str(folder)!r}, "--out", {str(tmp_path / "m.json")!r}, "--threads", "2"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "whole shard does not fit" in result.stdout
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) > 4 * budget
    zeros = hashlib.sha256(bytes(6144 * 8192 * 2)).hexdigest()
    assert json.loads((tmp_path / "m.json").read_text())["tensors"]["layer1.a"]["sha256"] == zeros


def test_reference_probes_from_a_trusted_configuration(tmp_path, capsys):
    """Probes through the demo checkpoint's own template: the greedy continuation (decode path) agrees with the
    top-1 of the teacher-forced logprobs (prefill path) at every generated position."""
    from moerun.runtime.probe_set import ANSWER_CASES, PROBES, TEMPLATE_CASES
    from moerun.runtime.tokenizer import Tokenizer
    from moerun.runtime.trained_demo import trained_demo_folder

    folder = trained_demo_folder()
    config = tmp_path / "trusted.yaml"
    config.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32}\n")
    out = tmp_path / "m.json"
    assert main(["fingerprint", str(folder), "--out", str(out), "--probes-config", str(config), "--probe-tokens", "3",
                 "--answer-tokens", "2"]) == 0
    manifest = json.loads(out.read_text())
    probes = manifest["probes"]
    assert probes["configuration"]["backend"] == "cpu" and probes["configuration"]["dtype"] == "float32"
    assert probes["configuration"]["moerun"] and probes["top_logprobs"] == 20
    tokenizer = Tokenizer.from_folder(folder)
    assert [c["name"] for c in probes["cases"]] == [p["name"] for p in PROBES]
    for case in probes["cases"]:
        prompt, greedy = case["prompt_ids"], case["greedy_ids"]
        assert tokenizer.decode(prompt, skip_special_tokens=False) == tokenizer.apply_chat_template(
            case["messages"], tools=case.get("tools"))
        assert len(case["top_ids"]) == len(prompt) + len(greedy) and len(case["top_ids"][0]) == 20
        for i, token in enumerate(greedy):
            assert case["top_ids"][len(prompt) - 1 + i][0] == token, (case["name"], i)
        row = case["top_logprobs"][-1]
        assert row == sorted(row, reverse=True) and sum(2.718281828 ** v for v in row) <= 1 + 1e-5
    # The floor: the trusted config in bfloat16 on the same tokens, its rows aligned with the reference's.
    floor = probes["floor"]
    assert floor["configuration"]["dtype"] == "bfloat16" and [c["name"] for c in floor["cases"]] == [
        c["name"] for c in probes["cases"]]
    rows = [(ref, flo) for case, fc in zip(probes["cases"], floor["cases"])
            for ref, flo in zip(case["top_ids"], fc["top_ids"])]
    assert len(rows) == sum(len(c["top_ids"]) for c in probes["cases"]) == sum(len(c["top_ids"]) for c in floor["cases"])
    assert 0.8 < sum(ref[0] == flo[0] for ref, flo in rows) / len(rows) < 1  # bf16 rounding moves some, not most
    assert [c["name"] for c in probes["template"]] == [c["name"] for c in TEMPLATE_CASES]
    assert all(c["prompt_tokens"] > 10 for c in probes["template"])
    answers = probes["answers"]
    assert answers["max_tokens"] == 2 and [c["name"] for c in answers["cases"]] == [c["name"] for c in ANSWER_CASES]
    assert all(c["reference"]["finish"] in ("stop", "length") for c in answers["cases"])
    assert main(["fingerprint", "--check", str(folder), str(out)]) == 0  # probes do not enter the digest
