"""Loading within memory: the peak resident memory of a real load against the bytes it loaded, experts built in
the Ascend layout without a second copy, and out-of-memory as one line naming what and how much."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_yaml
from fp8_checkpoints import dequantize_numpy, make_fp8_pair
from release_checkpoint import write_release_checkpoint
from safetensors import safe_open

from moerun.runtime.cli import main
from moerun.runtime.engine import Engine

# Peak RSS growth of a load over the bytes of the weights it holds (docs/architecture.md names the bound).
PEAK_OVER_WEIGHTS = 1.3


@pytest.fixture(scope="module")
def wide_fp8(tmp_path_factory) -> Path:
    """One M2-width FP8 layer (hidden 3072, experts of 1536, 128x128 blocks) with 16 experts and a small vocab:
    ~0.3 GB on disk, ~0.6 GB once loaded in bf16, built in about a second."""
    folder = tmp_path_factory.mktemp("wide") / "ckpt"
    return write_release_checkpoint(folder, num_layers=1, num_local_experts=16, vocab_size=8192)


@pytest.fixture(scope="module")
def wide_w8a8(tmp_path_factory) -> Path:
    """The same layer in msModelSlim's W8A8 layout: int8 linears and experts with fp32 channel scales, ~0.37 GB
    loaded."""
    folder = tmp_path_factory.mktemp("wide_w8a8") / "ckpt"
    return write_release_checkpoint(folder, num_layers=1, num_local_experts=16, vocab_size=8192, w8a8=True)


def _in_subprocess(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)


def _yaml(tmp_path: Path, folder: Path, **sections) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_yaml(folder, dtype="bfloat16", **sections)))
    return path


@pytest.mark.parametrize("checkpoint,loaded", [("wide_fp8", (0.55e9, 0.7e9)), ("wide_w8a8", (0.33e9, 0.42e9))])
def test_peak_rss_of_a_load_stays_within_the_bound(checkpoint, loaded, request, tmp_path):
    """In a fresh process: resident memory before the load, the peak during it, and the bytes of every distinct
    storage the loaded model holds. Mapped checkpoint pages, a float32 copy of an expert stack or a second
    layout of it would each push the growth past the bound."""
    folder = request.getfixturevalue(checkpoint)
    out = _in_subprocess(f"""
        import json, torch
        from moerun.runtime.engine import Engine
        from moerun.runtime.run_config import load_run_config
        from moerun.runtime.weights import tensors

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        run = load_run_config({str(_yaml(tmp_path, folder))!r})
        torch.empty(1) + 1  # torch's own lazy setup, before the baseline
        before = status("VmRSS:")
        engine = Engine(run)
        storages = {{t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(engine.model.weights)}}
        print(json.dumps({{"before": before, "peak": status("VmHWM:"), "weights": sum(storages.values())}}))
        """, tmp_path)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.splitlines()[-1])
    assert loaded[0] < m["weights"] < loaded[1]  # the checkpoint really is hundreds of MB once loaded
    growth = m["peak"] - m["before"]
    assert growth <= PEAK_OVER_WEIGHTS * m["weights"], f"load grew RSS by {growth / m['weights']:.2f}x the weights"


def test_out_of_host_memory_while_allocating_is_one_line(wide_fp8, tmp_path):
    """A real allocation failure: the address space is capped (RLIMIT_AS) after imports, just above what the
    embedding and attention need (and the shards' header mappings), so the expert stack cannot be allocated."""
    out = _in_subprocess(f"""
        import pathlib, resource, sys
        import torch
        from moerun.runtime.cli import main

        torch.empty(1) + 1
        size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        shards = sum(p.stat().st_size for p in pathlib.Path({str(wide_fp8)!r}).glob("*.safetensors"))
        cap = size + shards + (400 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        sys.exit(main(["smoke", "--layers", "1", "-c", {str(_yaml(tmp_path, wide_fp8))!r}]))
        """, tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("moerun: error:")]
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "out of memory allocating model.layers.0.block_sparse_moe.experts (0.45 GB on cpu)" in errors[0]
    assert "--layers" in errors[0] and "more devices" in errors[0]


def test_weights_larger_than_free_memory_are_refused_before_loading(hf_checkpoint, write_yaml, capsys, monkeypatch):
    import moerun.runtime.memory as memory

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    monkeypatch.setattr(memory, "host_memory_available", lambda: 100_000)
    code = main(["smoke", "-c", str(write_yaml(run_yaml(folder)))])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moerun: error:")]
    assert code == 2 and len(errors) == 1
    assert "not enough memory: the weights of 2 layers need" in errors[0] and "0.1 MB free" in errors[0]
    assert "--layers N, or model.num_layers" in errors[0]


def test_kv_cache_allocation_failure_names_layer_and_size(hf_checkpoint, write_yaml, capsys, monkeypatch):
    """The CPU allocator's own failure (as torch raises it) while the KV cache is allocated, after the weights."""
    from moerun.backends.cpu.backend import CpuBackend

    def fail(self, *args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536 bytes.")

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    monkeypatch.setattr(CpuBackend, "allocate_kv_cache", fail)
    code = main(["smoke", "-c", str(write_yaml(run_yaml(folder)))])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moerun: error:")]
    assert code == 2 and len(errors) == 1
    # 2 x 128 blocks x 16 tokens x 2 kv heads x 16 dims x 4 bytes
    assert "out of memory allocating the KV cache of layer 0 (0.5 MB on cpu)" in errors[0]
    assert "lower kv_cache.num_blocks (now 128)" in errors[0]


def test_ascend_experts_are_filled_in_place_in_grouped_matmul_layout(hf_checkpoint, write_yaml, tmp_path, monkeypatch):
    """The loader fills the backend's (E, H, 2I) / (E, I, H) stacks through [E, 2I, H] / [E, H, I] views, so
    prepare_experts hands over the very same memory (emulation: no device copy either), and each expert's
    columns equal the independent numpy dequantization of its w1, w3 and w2."""
    from moerun.backends.ascend.backend import AscendBackend

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    seen = []
    prepare = AscendBackend.prepare_experts
    monkeypatch.setattr(AscendBackend, "prepare_experts", lambda self, w: seen.append(w) or prepare(self, w))
    engine = Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8", backend="ascend", block_size=128,
                                                    ascend={"emulate": True})))
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        def reference(name: str) -> torch.Tensor:
            return dequantize_numpy(f.get_tensor(name), f.get_tensor(name + "_scale_inv"), (16, 16))

        for i, layer in enumerate(engine.model.weights.layers):
            assert layer.experts.w13.untyped_storage().data_ptr() == seen[i].w13.untyped_storage().data_ptr()
            assert layer.experts.w2.untyped_storage().data_ptr() == seen[i].w2.untyped_storage().data_ptr()
            assert layer.experts.w13.is_contiguous() and layer.experts.w2.is_contiguous()
            for e in range(layer.experts.w13.shape[0]):
                p = f"model.layers.{i}.block_sparse_moe.experts.{e}"
                w13 = torch.cat([reference(f"{p}.w1.weight"), reference(f"{p}.w3.weight")]).T
                assert torch.equal(layer.experts.w13[e], w13)
                assert torch.equal(layer.experts.w2[e], reference(f"{p}.w2.weight").T)


def test_progress_counts_every_checkpoint_byte(hf_checkpoint, write_yaml, tmp_path):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    make_fp8_pair(folder, tmp_path / "fp8", tmp_path / "ref", (16, 16))
    calls = []
    Engine.from_config(write_yaml(run_yaml(tmp_path / "fp8")), progress=lambda done, total: calls.append((done, total)))
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert calls[-1] == (stored, stored)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
