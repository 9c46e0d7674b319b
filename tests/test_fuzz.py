"""Property-based fuzzing of every input moerun reads: the YAML config, config.json, the shard index, safetensors
headers and the command line. Each generated case runs the CLI in-process and must keep the bad-input promise:
exit 0 or 2 (1 only for a smoke FAIL), no traceback, an error as exactly one line, nothing else on stderr but
progress, no file left half-written (--out exists exactly when the run succeeded, no temporary files), and an
answer at all (a hang fails the case after HANG_S seconds: a bound on hangs, not a timing check).

Hypothesis runs derandomized (a fixed seed per test, no example database), so CI replays the same cases. The
example counts keep the whole file near a minute on two cores."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bad_input import assert_promise, hang_guard, leftovers, run_cli
from conftest import run_yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moerun.runtime import demo

HANG_S = 120
INDEX = "model.safetensors.index.json"


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ---- values ------------------------------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 7, 16, 64, 211, 512, 2**31, 2**63, 2**64, 10**30, -(10**30)]
EDGE_TEXT = ["", "32", "abc", "nan", "inf", "-1", "\x00", "../x", "/etc/passwd", "cpu", "float32", "fp8", "default",
             "x" * 300, "é", "\u202e"]
SCALARS = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.integers(-300, 300),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_TEXT), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8)
DELETE = object()


def logits_on(cfg: Path, capsys) -> int:
    """`moerun logits` with the config file `cfg`, held to the promise; --out (beside cfg) must exist exactly when
    the run succeeded, hold finite logits then, and nothing temporary may be left. Returns the exit code."""
    tmp = cfg.parent
    out = tmp / "o.npy"
    out.unlink(missing_ok=True)
    with hang_guard(HANG_S):
        code, errors, err = run_cli(["logits", "-c", cfg, "--token-ids", "1,2,3", "--out", out], capsys)
    assert_promise(code, errors, err)
    assert out.exists() == (code == 0), err
    if code == 0:
        assert np.isfinite(np.load(out)).all(), "exit 0 with non-finite logits: a silently wrong result"
    assert leftovers(tmp) == []
    return code


def logits_on_checkpoint(folder: Path, capsys) -> int:
    cfg = folder.parent / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_yaml(folder)))
    return logits_on(cfg, capsys)


@pytest.fixture(scope="module")
def float_checkpoint(hf_checkpoint):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32, seed=5, max_shard_size="40KB")  # as test_hf_parity
    return folder


def linked_copy(src: Path, dest: Path, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder whose shards are hard links to `src`'s (cheap), except the files named in `copy`."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        (shutil.copy if f.name in copy or f.suffix != ".safetensors" else os.link)(f, dest / f.name)
    return dest


# ---- the YAML config -----------------------------------------------------------------------------------------------

YAML_KEYS = [("backend",), ("model", "path"), ("model", "dtype"), ("model", "num_layers"), ("kv_cache", "block_size"),
             ("kv_cache", "num_blocks"), ("cpu", "threads"), ("cuda", "fp8"), ("cuda", "graph_max_batch"),
             ("ascend", "emulate"), ("ascend", "device"), ("model",), ("kv_cache",), ("cpu",)]
YAML_STRAY_KEYS = [("stray",), ("model", "stray")]
YAML_NOISE = st.text(alphabet="&*!|>{}[]:-#%@`'\"\\\t\n ,?abc019", max_size=12)


@st.composite
def yaml_documents(draw, checkpoint: Path) -> bytes:
    data = run_yaml(checkpoint)
    keys = st.sampled_from(YAML_KEYS * 4 + YAML_STRAY_KEYS)  # repeats weigh the draw
    for path in draw(st.lists(keys, min_size=1, max_size=3)):
        value = draw(VALUES)
        section = data
        for key in path[:-1]:
            section = section.setdefault(key, {}) if isinstance(section.get(key, {}), dict) else {}
        section[path[-1]] = value
    text = yaml.safe_dump(data, allow_unicode=True)
    how = draw(st.sampled_from(["as is", "spliced", "bytes"]))
    if how == "spliced":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(YAML_NOISE) + text[at:]
    raw = text.encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=64)) + raw if how == "bytes" else raw


@pytest.fixture(scope="module")
def yaml_work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_yaml")


@given(data=st.data())
@fuzz(40)
def test_fuzz_yaml(data, float_checkpoint, yaml_work, capsys):
    document = data.draw(yaml_documents(float_checkpoint))
    cfg = yaml_work / "run.yaml"
    cfg.write_bytes(document)
    logits_on(cfg, capsys)


# ---- config.json -----------------------------------------------------------------------------------------------------

CONFIG_FIELDS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rotary_dim", "partial_rotary_factor", "rope_theta",
                 "rope_parameters", "rope_scaling", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                 "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "torch_dtype", "use_qk_norm", "qk_norm_type", "scoring_func", "shared_intermediate_size",
                 "attn_type_list", "quantization_config", "stray"]
QUANT_FIELDS = ["quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert"]


@st.composite
def config_documents(draw, base: dict) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    cfg = json.loads(json.dumps(base))
    for field in draw(st.lists(st.sampled_from(CONFIG_FIELDS), min_size=1, max_size=3)):
        if field == "quantization_config" and draw(st.booleans()):
            value = {k: draw(VALUES) for k in draw(st.lists(st.sampled_from(QUANT_FIELDS), max_size=3))}
            value.setdefault("quant_method", "fp8")
        else:
            real = base.get(field)
            near = st.integers(0, 2 * real if type(real) is int and real > 0 else 8)  # relations, not just types
            value = draw(st.one_of(st.just(DELETE), VALUES, near))
        if value is DELETE:
            cfg.pop(field, None)
        else:
            cfg[field] = value
    return json.dumps(cfg).encode()


@pytest.fixture(scope="module")
def config_work(float_checkpoint, tmp_path_factory):
    return linked_copy(float_checkpoint, tmp_path_factory.mktemp("fuzz_config") / "ckpt")


@given(data=st.data())
@fuzz(50)
def test_fuzz_config_json(data, float_checkpoint, config_work, capsys):
    base = json.loads((float_checkpoint / "config.json").read_text())
    (config_work / "config.json").write_bytes(data.draw(config_documents(base)))
    logits_on_checkpoint(config_work, capsys)


# ---- the shard index --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_work(float_checkpoint, tmp_path_factory):
    folder = linked_copy(float_checkpoint, tmp_path_factory.mktemp("fuzz_index") / "ckpt")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    shutil.copy(folder / shards[0], folder.parent / "outside.safetensors")  # a valid shard, but outside
    return folder


def leaves_the_folder(name: object, folder: Path) -> bool:
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    return not (folder / name).resolve().is_relative_to(folder.resolve())


@given(data=st.data())
@fuzz(40)
def test_fuzz_index(data, float_checkpoint, index_work, capsys):
    index = json.loads((float_checkpoint / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    names = st.one_of(st.sampled_from(shards + ["../outside.safetensors", str(index_work.parent / "outside.safetensors"),
                                                "/etc/passwd", "", ".", "..", "sub/../" + shards[0], "nope.safetensors",
                                                "x" * 300, "a\x00b"]), st.text(max_size=10))
    kind = data.draw(st.sampled_from(["names", "names", "names", "weight_map", "document", "bytes"]))
    if kind == "names":
        targets = data.draw(st.lists(st.sampled_from(shards), min_size=1, max_size=3, unique=True))
        renamed = {shard: data.draw(names) for shard in targets}
        index["weight_map"] = {k: renamed.get(v, v) for k, v in index["weight_map"].items()}
        document = json.dumps(index).encode()
    elif kind == "weight_map":
        document = json.dumps({"weight_map": data.draw(VALUES)}).encode()
    elif kind == "document":
        document = json.dumps(data.draw(VALUES)).encode()
    else:
        document = data.draw(st.binary(max_size=80))
    (index_work / INDEX).write_bytes(document)
    code = logits_on_checkpoint(index_work, capsys)
    if kind == "names" and any(leaves_the_folder(n, index_work) for n in renamed.values()):
        assert code == 2, "a shard outside the checkpoint folder was read"


# ---- safetensors headers ----------------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "XX", ""]


@pytest.fixture(scope="module")
def header_work(float_checkpoint, tmp_path_factory):
    shards = sorted(p.name for p in float_checkpoint.glob("*.safetensors"))
    return linked_copy(float_checkpoint, tmp_path_factory.mktemp("fuzz_header") / "ckpt", copy=(shards[0],)), shards[0]


@given(data=st.data())
@fuzz(40)
def test_fuzz_safetensors_header(data, float_checkpoint, header_work, capsys):
    folder, shard = header_work
    original = (float_checkpoint / shard).read_bytes()
    n = struct.unpack("<Q", original[:8])[0]
    header, body = json.loads(original[8:8 + n]), original[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    declared = None
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "length", "value"]
                                         + ["same_size_dtype", "same_size_shape"] * 3))
        name = data.draw(st.sampled_from(names))
        entry = header.get(name) if isinstance(header.get(name), dict) else {}
        if what == "same_size_dtype" and entry.get("dtype") == "F32":  # valid for safetensors, wrong for moerun
            header[name] = {**entry, "dtype": data.draw(st.sampled_from(["I32", "U32"]))}
        elif what == "same_size_shape" and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2:
            rows, cols = entry["shape"]
            header[name] = {**entry, "shape": data.draw(st.sampled_from([[cols, rows], [rows * cols], [1, rows * cols]]))}
        elif what == "dtype":
            header[name] = {**entry, "dtype": data.draw(st.one_of(st.sampled_from(DTYPES), VALUES))}
        elif what == "shape":
            header[name] = {**entry, "shape": data.draw(st.one_of(st.lists(st.sampled_from(EDGE_INTS), max_size=3), VALUES))}
        elif what == "offsets":
            header[name] = {**entry, "data_offsets": data.draw(st.lists(st.sampled_from(EDGE_INTS + [len(body)]), max_size=3))}
        elif what == "drop":
            header.pop(name, None)
        elif what == "add":
            header[data.draw(st.text(max_size=8))] = data.draw(VALUES)
        elif what == "length":
            declared = data.draw(st.one_of(st.sampled_from([0, 1, n - 1, n + 1, 2**63, 2**64 - 1]),
                                           st.integers(0, 2**64 - 1)))
        else:
            header[name] = data.draw(VALUES)
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw) if declared is None else declared) + raw + body
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))))
    (folder / shard).write_bytes(blob if cut is None else blob[:cut])
    logits_on_checkpoint(folder, capsys)


# ---- the command line -------------------------------------------------------------------------------------------------

FLAGS = {"generate": ["-p", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--raw"],
         "logits": ["--token-ids", "--out"], "smoke": ["--layers", "--steps"]}
FOREIGN_FLAGS = ["--nope", "-c", "--out", "--token-ids", "-p", "--steps"]
FLAG_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-0", "1e309", "1e-300", str(2**64), str(2**64 - 1),
                                         "-1", "0", "1", "2", "8", "0.5", "1,2,3", "1,,x", "", " "]),
                        st.integers(-5, 12).map(str), st.floats().map(str), st.text(max_size=8))


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory):
    """The demo checkpoint, and a YAML whose KV cache holds 128 tokens: long generations are refused up front, so
    every case that runs is short."""
    work = tmp_path_factory.mktemp("fuzz_cli")
    (work / "demo").mkdir()
    demo.write_demo_checkpoint(work / "demo")
    (work / "run.yaml").write_text(yaml.safe_dump({"backend": "cpu", "model": {"path": str(work / "demo"),
                                                   "dtype": "float32"}, "kv_cache": {"num_blocks": 8}}))
    os.mkfifo(work / "fifo")
    (work / "cache").mkdir()
    return work


@given(data=st.data())
@fuzz(25)
def test_fuzz_command_line(data, cli_work, capsys, monkeypatch):
    monkeypatch.setenv("MOERUN_CACHE", str(cli_work / "cache"))  # commands without -c build the demo here
    command = data.draw(st.sampled_from(["generate", "logits", "smoke"]))
    out_dir = cli_work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    argv = [command]
    if data.draw(st.integers(0, 4)):
        argv += ["-c", cli_work / "run.yaml"]
    flags = st.sampled_from(FLAGS[command] * (12 // len(FLAGS[command]) + 1) + FOREIGN_FLAGS[:2])
    for flag in data.draw(st.lists(flags, max_size=4)):
        if flag == "--out":
            argv += [flag, data.draw(st.sampled_from([out_dir / "o.npy", out_dir, "/dev/null", cli_work / "fifo",
                                                      out_dir / "missing" / "o.npy"]))]
        elif flag == "--raw":
            argv.append(flag)
        else:
            argv += [flag, data.draw(FLAG_VALUES)]
    if command == "generate" and "-p" not in argv and data.draw(st.booleans()):
        argv += ["-p", "hello"]
    with hang_guard(HANG_S):
        code, errors, err = run_cli(argv, capsys)
    assert_promise(code, errors, err, allowed=(0, 1, 2) if command == "smoke" else (0, 2))
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    wrote = command == "logits" and code == 0 and bool(outs) and Path(outs[-1]) == out_dir / "o.npy"
    assert (out_dir / "o.npy").exists() == wrote, err
    assert leftovers(out_dir) == [] and leftovers(cli_work / "cache") == []
