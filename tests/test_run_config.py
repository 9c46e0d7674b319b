from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moerun.backends.errors import ConfigError
from moerun.runtime.parallel_config import ParallelConfig
from moerun.runtime.run_config import BUILTIN_DEMO, SchedulerConfig, load_run_config, parse_run_config


def test_relative_model_path_resolves_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "run.yaml"
    cfg.write_text("backend: cpu\nmodel:\n  path: ../ckpt\n  dtype: bfloat16\n")
    run = load_run_config(cfg)
    assert run.model_path == str((tmp_path / "ckpt").resolve())
    assert run.dtype == torch.bfloat16 and run.kv_num_blocks is None and run.kv_block_size is None
    assert run.backend_options == {"threads": 0, "weights": "model"}


def test_builtin_demo_and_defaults():
    run = parse_run_config({"backend": "cpu", "model": {"path": BUILTIN_DEMO}}, Path("."))
    assert run.model_path == BUILTIN_DEMO and run.dtype == torch.bfloat16
    assert run.scheduler == SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=None,
                                            enable_prefix_caching=True)


def test_parallel_and_kv_sizing_keys():
    raw = {"backend": "cpu", "model": {"path": "x"}, "kv_cache": {"memory_fraction": 1},
           "parallel": {"tensor_parallel_size": 2, "expert_parallel_size": None, "init_timeout_s": 30}}
    run = parse_run_config(raw, Path("."))
    assert run.kv_memory_fraction == 1 and run.kv_num_blocks is None
    assert run.parallel == ParallelConfig(tensor_parallel_size=2, expert_parallel_size=None, init_timeout_s=30)


def test_scheduler_section():
    raw = {"backend": "cpu", "model": {"path": "x"}, "scheduler": {"max_num_seqs": 8, "max_model_len": 1024,
                                                                    "enable_prefix_caching": False}}
    run = parse_run_config(raw, Path("."))
    assert run.scheduler == SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=1024,
                                            enable_prefix_caching=False)


@pytest.mark.parametrize("raw,message", [
    ([], "top level must be a mapping"),
    ({"model": {"path": "x"}}, "backend: missing"),
    ({"backend": "cpu"}, "model: missing"),
    ({"backend": "cpu", "model": {"dtype": "float32"}}, "model.path: missing"),
    ({"backend": "cpu", "model": {"path": "x", "num_layers": 0}}, "model.num_layers: 0 is out of range (allowed: 1..4096)"),
    ({"backend": "cpu", "model": {"path": "x", "num_layers": True}}, "model.num_layers: expected int"),
    ({"backend": "cpu", "model": "x"}, "model: expected a mapping"),
    ({"backend": "cpu", "model": {"path": "x"}, "cpu": {"threads": "4"}}, "cpu.threads: expected int"),
    ({"backend": "cpu", "model": {"path": "x"}, "scheduler": {"max_num_seqs": 0}},
     "scheduler.max_num_seqs: 0 is out of range (allowed: 1..65536)"),
    ({"backend": "cpu", "model": {"path": "x"}, "scheduler": {"enable_prefix_caching": "yes"}},
     "scheduler.enable_prefix_caching: expected bool"),
    ({"backend": "cpu", "model": {"path": "x"}, "scheduler": {"max_batch": 4}}, "scheduler.max_batch: unknown key"),
    ({"backend": "cpu", "model": {"path": "x"}, "kv_cache": {"memory_fraction": 1.5}},
     "kv_cache.memory_fraction: 1.5 is out of range (allowed: more than 0, at most 1)"),
    ({"backend": "cpu", "model": {"path": "x"}, "kv_cache": {"memory_fraction": float("nan")}},
     "kv_cache.memory_fraction: nan is out of range"),
    ({"backend": "cpu", "model": {"path": "x"}, "parallel": {"tensor_parallel_size": 0}},
     "parallel.tensor_parallel_size: 0 is out of range (allowed: 1..4096)"),
    ({"backend": "cpu", "model": {"path": "x"}, "parallel": {"expert_parallel_size": "2"}},
     "parallel.expert_parallel_size: expected int, got '2'"),
    ({"backend": "cpu", "model": {"path": "x"}, "parallel": {"init_timeout_s": -1}},
     "parallel.init_timeout_s: -1 is out of range (allowed: more than 0, at most 86400)"),
    ({"backend": "cpu", "model": {"path": "x"}, "parallel": {"pipeline_parallel_size": 2}},
     "parallel.pipeline_parallel_size: unknown key"),
    ({"backend": "cpu", "model": {"path": "x"}, "parallel": [2]}, "parallel: expected a mapping"),
])
def test_errors_name_the_key_path(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(raw, Path("."))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_are_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_run_config(path)


def test_the_a2_w8a8_config_is_one_a2_node():
    run = load_run_config(CONFIGS / "m27_a2_w8a8.yaml")
    assert run.backend == "ascend" and run.dtype == torch.bfloat16 and run.kv_block_size == 128
    assert run.backend_options["emulate"] is False and run.kv_num_blocks is None and 0 < run.kv_memory_fraction <= 1
    assert run.parallel == ParallelConfig(tensor_parallel_size=8, expert_parallel_size=8, init_timeout_s=1800)
