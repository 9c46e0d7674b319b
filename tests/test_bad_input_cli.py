"""Bad command lines, one line each (issue 7's examples and their classes): sampling flags, --out targets, requests
longer than the model or the KV cache, out-of-memory, and signals from the first moment of the process."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import assert_one_line, assert_promise, leftovers, run_cli

from moerun.runtime import demo
from moerun.runtime.commands import common


@pytest.fixture(scope="module")
def demo_yaml(tmp_path_factory) -> Path:
    """The demo checkpoint (4096 positions, with tokenizer and template) and a YAML whose KV cache holds 6400
    tokens, so the model's positions are the limit a long request meets first."""
    folder = tmp_path_factory.mktemp("demo")
    demo.write_demo_checkpoint(folder)
    path = folder.parent / "demo_run.yaml"
    path.write_text(yaml.safe_dump({"backend": "cpu", "model": {"path": str(folder), "dtype": "float32"},
                                    "kv_cache": {"num_blocks": 400, "block_size": 16}}))
    return path


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if a command gets as far as building an engine: its checks must come first."""
    from moerun.runtime import engine

    monkeypatch.setattr(engine.Engine, "__init__", lambda *a, **k: pytest.fail("the engine was built before the check"))


def generate(cfg, *flags):
    return ["generate", "-c", cfg, "-p", "hello", "--max-tokens", "2", *flags]


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "Invalid value for '--temperature': 'nan' is not a finite number."),
    (["--temperature", "inf"], "Invalid value for '--temperature': inf is not in the range 0.0<=x<=10000.0."),
    (["--temperature", "1e-30"], "--temperature: 1e-30 is too small (allowed: 0 for greedy, or 1e-05..1e4)"),
    (["--top-p", "nan"], "Invalid value for '--top-p': 'nan' is not a finite number."),
    (["--top-p", "0"], "Invalid value for '--top-p': 0.0 is not in the range 0.0<x<=1.0."),
    (["--seed", str(2**64)], "Invalid value for '--seed': 18446744073709551616 is not in the range 0<=x<=18446744073709551615."),
    (["--seed", "-1"], "is not in the range 0<=x<=18446744073709551615."),
    (["-p", "\udcff"], "-p: not valid UTF-8 text (character 0)"),
])
def test_sampling_flags(flags, message, demo_yaml, no_engine, capsys):
    assert_one_line(*run_cli(generate(demo_yaml, *flags), capsys), message)


@pytest.mark.parametrize("flag,value", [("--mean-kl", "nan"), ("--min-top1", "1.5"), ("--max-kl", "-inf")])
def test_parity_thresholds(flag, value, demo_yaml, capsys):
    assert_one_line(*run_cli(["parity", "-c", demo_yaml, "-c", demo_yaml, "--token-ids", "1", flag, value], capsys),
                    f"Invalid value for '{flag}'")


def test_largest_seed_is_accepted(demo_yaml, capsys):
    code, errors, err = run_cli(generate(demo_yaml, "--temperature", "0.7", "--seed", str(2**64 - 1)), capsys)
    assert_promise(code, errors, err, allowed=(0,))


def test_5000_ids_through_a_4096_position_model(demo_yaml, tmp_path, no_engine, capsys):
    ids = ",".join(["7"] * 5000)
    assert_one_line(*run_cli(["logits", "-c", demo_yaml, "--token-ids", ids, "--out", tmp_path / "o.npy"], capsys),
                    "--token-ids (5000 ids): 5000 tokens in one sequence, more than the model's max_position_embeddings 4096")


def test_requests_beyond_the_longest_the_engine_serves(demo_yaml, tmp_path, no_engine, capsys):
    """The model's positions, the KV cache, or scheduler.max_model_len: whichever is smallest, named."""
    code, errors, err = run_cli(generate(demo_yaml, "--max-tokens", "4090"), capsys)
    assert_one_line(code, errors, err, "more than the model's max_position_embeddings 4096")
    assert "the prompt (" in errors[0] and " tokens) plus --max-tokens 4090: " in errors[0]
    small = tmp_path / "small.yaml"
    small.write_text(demo_yaml.read_text().replace("num_blocks: 400", "num_blocks: 4"))
    assert_one_line(*run_cli(generate(small, "--max-tokens", "100"), capsys),
                    "tokens in one sequence, more than the 64 tokens the KV cache holds (kv_cache.num_blocks 4 x "
                    "block_size 16); raise kv_cache.num_blocks")
    assert_one_line(*run_cli(["smoke", "-c", small, "--steps", "50"], capsys),
                    "smoke prompts of 5, 11, 17 tokens plus --steps 50: 67 tokens in one sequence, more than the 64")
    capped = tmp_path / "capped.yaml"
    capped.write_text(demo_yaml.read_text() + "scheduler: {max_model_len: 100}\n")
    assert_one_line(*run_cli(["logits", "-c", capped, "--token-ids", ",".join(["3"] * 101), "--out",
                              tmp_path / "o.npy"], capsys),
                    "--token-ids (101 ids): 101 tokens in one sequence, more than scheduler.max_model_len 100")


def test_token_ids_outside_the_vocabulary_are_refused_before_loading(demo_yaml, tmp_path, no_engine, capsys):
    assert_one_line(*run_cli(["logits", "-c", demo_yaml, "--token-ids", "1,-1", "--out", tmp_path / "o.npy"], capsys),
                    "--token-ids: token id -1 at position 1 is outside the vocabulary (allowed: 0..639)")


@pytest.mark.parametrize("target,message", [
    ("missing_folder", "--out: folder {tmp}/nope does not exist"),
    ("parent_is_a_file", "--out: folder {tmp}/file does not exist"),
    ("directory", "--out: {tmp} is a directory; moerun writes only regular files"),
    ("device", "--out: /dev/null is a character device; moerun writes only regular files"),
    ("fifo", "--out: {tmp}/fifo is a FIFO; moerun writes only regular files"),
    ("unwritable", "--out: cannot write in /proc"),
])
def test_out_is_checked_before_any_work(target, message, demo_yaml, tmp_path, no_engine, capsys):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    out = {"missing_folder": tmp_path / "nope" / "o.npy", "parent_is_a_file": tmp_path / "file" / "o.npy",
           "directory": tmp_path, "device": "/dev/null", "fifo": tmp_path / "fifo", "unwritable": "/proc/o.npy"}[target]
    assert_one_line(*run_cli(["logits", "-c", demo_yaml, "--token-ids", "1,2", "--out", out], capsys),
                    message.format(tmp=tmp_path))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # never replaced by a regular file
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_nothing(demo_yaml, tmp_path, capsys, monkeypatch):
    import numpy as np

    def disk_full(f, array):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    out = tmp_path / "o.npy"
    assert_one_line(*run_cli(["logits", "-c", demo_yaml, "--token-ids", "1,2", "--out", out], capsys),
                    f"--out: cannot write {out} (No space left on device)")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["torch", "python", "cpu_allocator"])
def test_out_of_memory_anywhere_is_one_line(error, demo_yaml, tmp_path, capsys, monkeypatch):
    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(common, "load_run_config", allocate)
    code, errors, err = run_cli(["logits", "-c", demo_yaml, "--token-ids", "1", "--out", tmp_path / "o.npy"], capsys)
    assert_one_line(code, errors, err, "out of memory (")
    assert "load fewer layers (--layers, model.num_layers), lower kv_cache.num_blocks" in errors[0]


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(demo_yaml, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(common, "load_run_config", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["logits", "-c", demo_yaml, "--token-ids", "1", "--out", tmp_path / "o.npy"], capsys)


def test_the_group_imports_no_command_before_one_runs():
    """What makes early Ctrl-C and usage errors instant: the entry point and a usage error load neither torch
    nor any subcommand."""
    code = ("import sys; from moerun.__main__ import console_main; from moerun.runtime.cli import main; "
            "assert main(['nope']) == 2; "
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('moerun.runtime.commands.')], "
            "sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _signal_handlers_installed(pid: int) -> bool:
    """moerun's entry installs a SIGTERM handler first thing; Python itself catches only SIGINT."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see when the handlers are in")
@pytest.mark.parametrize("sig,after", [(signal.SIGINT, 0.0), (signal.SIGINT, 0.4), (signal.SIGINT, 1.5),
                                       (signal.SIGTERM, 1.0)])
def test_signals_from_the_first_moment(sig, after, demo_yaml, tmp_path):
    """From the moment moerun's own code runs (before torch is imported, while it is, while the model loads and
    generates 3000 tokens): one line, 130 or 143, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "moerun", "generate", "-c", str(demo_yaml), "-p", "hi",
                             "--max-tokens", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _signal_handlers_installed(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("loading ")]
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and "Exception" not in err, err
    assert lines == ["moerun: interrupted" if sig == signal.SIGINT else "moerun: terminated"], err


@pytest.mark.parametrize("content,message", [
    ('{"temperature": -1}', "generation_config.json: temperature: -1 is not allowed (a number in [0.0, 10000.0])"),
    ('{"temperature": NaN}', "generation_config.json: temperature: nan is not allowed"),
    ('{"top_p": 2}', "generation_config.json: top_p: 2 is not allowed (a number in (0.0, 1.0])"),
    ('{"top_k": "40"}', "generation_config.json: top_k: '40' is not allowed (an integer >= -1)"),
])
def test_sampling_defaults_of_the_checkpoint_are_checked_like_flags(content, message, demo_yaml, tmp_path, capsys):
    """Before: generation_config.json's values were sampled with whatever they were (or a NaN silently dropped)."""
    run = yaml.safe_load(demo_yaml.read_text())
    folder = tmp_path / "ckpt"
    shutil.copytree(run["model"]["path"], folder)
    (folder / "generation_config.json").write_text(content)
    run["model"]["path"] = str(folder)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert_one_line(*run_cli(generate(cfg), capsys), message)


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--w8a8", "--max-shard-size", "9" * 400 + "GB", "src", "dst"], "--max-shard-size: expected a size from 1KB"),
    (["bench", "serve", "--endpoint", "http://127.0.0.1:9/v1", "--timeout", "nan"], "'nan' is not a finite number"),
    (["bench", "serve", "--endpoint", "http://127.0.0.1:9/v1", "--random-range-ratio", "nan"], "'nan' is not a finite number"),
])
def test_other_commands_flags(argv, message, capsys):
    assert_one_line(*run_cli(argv, capsys), message)
