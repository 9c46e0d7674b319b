"""The CUDA backend's YAML section and start-up refusals, on any machine: its module imports without Triton or a
GPU (the YAML validation imports every backend class), and a config it cannot run fails at build with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moerun.runtime.cli import main
from moerun.backends.errors import ConfigError, MoerunError, UnsupportedModelError
from moerun.runtime.run_config import parse_run_config

CONFIGS = Path(__file__).parents[1] / "configs"
INTERPRETER_SET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def test_backend_module_imports_and_validates_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "from pathlib import Path\n"
        "from moerun.runtime.run_config import parse_run_config\n"
        "raw = {'backend': 'cpu', 'model': {'path': 'builtin:demo'}, 'cuda': {'fp8': 'off', 'cuda_graphs': False}}\n"
        "print(parse_run_config(raw, Path('.')).backend)\n"
        "import moerun.backends.cuda.backend as b\n"
        "assert b.CudaBackend.capabilities.fp8_weights\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None and m.startswith('triton')]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"


@pytest.mark.parametrize("section,match", [
    ({"fp8": "yes"}, r"run\.yaml: cuda\.fp8: 'yes' is not allowed \(allowed: auto, on, off\)"),
    ({"grouped_mm": True}, r"run\.yaml: cuda\.grouped_mm: expected str"),
    ({"device": "cuda:0", "graphs": False},
     r"run\.yaml: cuda\.graphs: unknown key \(allowed: cuda_graphs, device, fp8, graph_max_batch, grouped_mm\)"),
])
def test_yaml_section_errors_name_the_key(section, match):
    raw = {"backend": "cpu", "model": {"path": "builtin:demo"}, "cuda": section}  # validated even when not chosen
    with pytest.raises(ConfigError, match=match):
        parse_run_config(raw, Path("."), source="run.yaml")


def test_shipped_cuda_demo_config_is_valid():
    from moerun.runtime.run_config import load_run_config

    run = load_run_config(CONFIGS / "cuda_demo.yaml")
    assert run.backend == "cuda" and run.dtype == torch.bfloat16 and run.backend_options["cuda_graphs"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_no_gpu_is_one_line_at_build(capsys):
    from moerun.backends.cuda.backend import CudaBackend

    with pytest.raises(UnsupportedModelError, match="backend cuda: (no CUDA device is visible|this torch build has no CUDA)"):
        CudaBackend({}, torch.bfloat16)
    assert main(["smoke", "-c", str(CONFIGS / "cuda_demo.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moerun: error:")]
    assert len(errors) == 1 and errors[0].startswith("moerun: error: backend cuda:")


@pytest.mark.skipif(INTERPRETER_SET, reason="TRITON_INTERPRET is set")
def test_cpu_device_needs_the_interpreter():
    from moerun.backends.cuda.backend import CudaBackend

    with pytest.raises(MoerunError, match="needs TRITON_INTERPRET=1"):
        CudaBackend({"device": "cpu"}, torch.bfloat16)
    with pytest.raises(MoerunError, match="is not a CUDA device"):
        CudaBackend({"device": "meta"}, torch.bfloat16)
