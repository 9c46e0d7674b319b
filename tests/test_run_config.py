from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moerun.backends.errors import ConfigError
from moerun.runtime.run_config import BUILTIN_DEMO, SchedulerConfig, load_run_config, parse_run_config


def test_relative_model_path_resolves_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "run.yaml"
    cfg.write_text("backend: cpu\nmodel:\n  path: ../ckpt\n  dtype: bfloat16\n")
    run = load_run_config(cfg)
    assert run.model_path == str((tmp_path / "ckpt").resolve())
    assert run.dtype == torch.bfloat16 and run.kv_num_blocks == 512 and run.kv_block_size is None
    assert run.backend_options == {"threads": 0, "weights": "model"}


def test_builtin_demo_and_defaults():
    run = parse_run_config({"backend": "cpu", "model": {"path": BUILTIN_DEMO}}, Path("."))
    assert run.model_path == BUILTIN_DEMO and run.dtype == torch.bfloat16
    assert run.scheduler == SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=None,
                                            enable_prefix_caching=True)


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
])
def test_errors_name_the_key_path(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(raw, Path("."))


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_run_config(path)
