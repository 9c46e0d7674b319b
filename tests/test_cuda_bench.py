"""`moerun bench` on the CPU (the miniature model; the figures of a GPU run are in docs/performance.md), and its
byte and FLOP counting checked against formulas written out from the model dimensions. No timing is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moerun.backends.cpu.backend import CpuBackend
from moerun.runtime import bench
from moerun.runtime.cli import main
from moerun.runtime.model import MiniMaxM2Model


def test_bench_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--out", str(out), "--compare", "transformers", "--hf-variants", "dynamic,static",
                 "--steps", "4", "--warmup", "1", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "decode" in printed and "prefill" in printed and "MBU" in printed and "MFU" in printed
    result = json.loads(out.read_text())
    assert result["model"]["name"] == "MiniMax-M2 miniature" and result["plan"]["small"]
    # --threads wins over the default config's cpu.threads (1)
    assert result["machine"]["torch_threads"] == 2 and result["machine"]["cpu_count"] >= 1
    assert [d["batch"] for d in result["decode"]] == [1, 8, 64]
    for row in [*result["decode"], result["prefill"]]:
        ours = row["moerun"]
        assert ours["samples"] == 4 and ours["min_ms"] <= ours["median_ms"] <= ours["max_ms"]  # a miniature prefills every run
        assert set(row["transformers"]) == {"dynamic", "static"} and row["transformers_fastest"] in row["transformers"]
        best = row["transformers"][row["transformers_fastest"]]["median_ms"]
        assert row["speedup"] == pytest.approx(best / ours["median_ms"])
        # the same seeded token ids, context and position on both sides: float32 logits agree to rounding
        for timed in row["transformers"].values():
            assert timed["logits_rel_diff"] <= 1e-4
    for d in result["decode"]:
        assert d["experts_counted"] and 1 <= d["distinct_experts_per_layer"] <= bench.SMALL["num_experts"]
        assert d["step_ms"] > 0 and math.isfinite(d["mbu"]) and d["mbu"] > 0 and "moerun_eager" not in d
    assert result["prefill"]["tokens"] == 256 and result["prefill"]["mfu"] > 0
    assert result["transformers"]["missing"] == {}
    assert result["machine"]["copy_bandwidth_gb_s"] > 0 and result["machine"]["matmul_tflops"] > 0


def test_measurements_are_interleaved_in_alternating_order():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": (lambda: calls.append("b"), lambda: calls.append("reset b"))}
    times = bench.time_interleaved(steps, CpuBackend({}, torch.float32), warmup=1, runs=3)
    assert calls == ["a", "b", "reset b", "a", "b", "reset b", "b", "reset b", "a", "a", "b", "reset b"]
    assert [len(t) for t in times.values()] == [3, 3]
    assert bench.spread([0.003, 0.001, 0.002]) == {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0, "samples": 3}


def test_bench_options_are_checked(tmp_path, capsys):
    assert main(["bench", "--batches", "1,x", "--out", str(tmp_path / "b.json")]) == 2
    assert "--batches: expected comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "--fp8", "--compare", "transformers"]) == 2
    assert main(["bench", "--compare", "transformers", "--hf-variants", "static,fast"]) == 2
    assert "--hf-variants: fast (allowed: dynamic, static, compiled)" in capsys.readouterr().err


def test_decode_bytes_counted_from_the_dimensions():
    """The step's bytes, from the weights the backend actually holds, against the formula written out."""
    dims = bench.SMALL
    cfg = bench.model_config(dims, 2)
    backend = CpuBackend({}, torch.bfloat16)
    model = MiniMaxM2Model(cfg, bench.SyntheticWeights(cfg, backend, fp8=False, seed=0).model(lambda: None), backend)
    h, i, e = dims["hidden_size"], dims["intermediate_size"], dims["num_experts"]
    q, kv, v = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"], dims["vocab_size"]
    distinct, seq_lens = [3, 5], [10, 20, 30]
    per_layer = 2 * (2 * h * q + 2 * h * kv) + 2 * (2 * h + q + kv) + 4 * (e * h + e)  # bf16 projections + norms, fp32 router
    expert = 2 * 3 * h * i
    kv_read = sum(seq_lens) * 2 * kv * 2  # K and V, bf16, per layer
    expected = 2 * per_layer + sum(distinct) * expert + 2 * kv_read + 2 * v * h + 2 * h + len(seq_lens) * h * 2
    assert bench.decode_bytes(model, distinct, seq_lens, kv_elem=2) == expected


def test_prefill_flops_match_the_m2_roofline():
    """shared/reference/performance.md §3.3: an 8k prompt of M2 is ~222 TFLOP = 2 * 10.4e9 active params * 8192
    + causal attention 2 * S^2 * 6144 * 62, counting the lm_head for every token; we count it for the last token
    only (what the engine computes), i.e. 2 * 614.6M * 8191 fewer."""
    cfg = bench.model_config(bench.M2, 62)
    tokens = 8192
    attention = 2 * tokens ** 2 * 6144 * 62
    roofline = 2 * 10.4e9 * tokens + attention - 2 * 614.6e6 * (tokens - 1)
    assert bench.prefill_flops(cfg, tokens) == pytest.approx(roofline, rel=0.01)


def test_runtime_bench_names_no_device_api():
    text = (Path(bench.__file__)).read_text()
    for name in ("torch.cuda", "torch_npu", "is_available"):
        assert name not in text
