"""Shared fixtures: transformers-saved checkpoints (built once per session) and a YAML writer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (hf_checkpoints) import by name

import hf_checkpoints  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """A backend sets torch's thread count for the whole process (cpu.threads, bench --threads, the demo config's
    one thread): each test leaves it as it found it, so no test runs with another's setting."""
    torch = sys.modules.get("torch")
    found = torch.get_num_threads() if torch is not None else None
    yield
    if found is not None and torch.get_num_threads() != found:
        torch.set_num_threads(found)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(shape_name, dtype, seed=0, max_shard_size=None) -> (folder, transformers model)."""
    import torch

    made = {}

    def make(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0, max_shard_size: str | None = None):
        key = (shape, dtype, seed, max_shard_size)
        if key not in made:
            model = hf_checkpoints.build_hf_model(hf_checkpoints.SHAPES[shape], seed=seed)
            folder = tmp_path_factory.mktemp(f"{shape}_{str(dtype).split('.')[-1]}_{seed}")
            hf_checkpoints.save_hf_checkpoint(model, folder, dtype, max_shard_size)
            made[key] = (folder, model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def w8a8_checkpoint(hf_checkpoint, tmp_path_factory):
    """w8a8_checkpoint(shape_name, dtype, seed=0) -> (W8A8 folder from `moerun quantize --w8a8`, float folder)."""
    from w8a8_checkpoints import quantize

    made = {}

    def make(shape: str, dtype, seed: int = 0):
        key = (shape, dtype, seed)
        if key not in made:
            folder, _ = hf_checkpoint(shape, dtype, seed)
            made[key] = (quantize(folder, tmp_path_factory.mktemp("w8a8") / "out"), folder)
        return made[key]

    return make


@pytest.fixture
def write_yaml(tmp_path):
    """write_yaml(dict, name="run.yaml") -> path of a YAML file in this test's tmp folder."""

    def write(data: dict, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def run_yaml(path, backend: str = "cpu", dtype: str = "float32", block_size: int | None = 16, **sections) -> dict:
    data = {"backend": backend, "model": {"path": str(path), "dtype": dtype}, "kv_cache": {"num_blocks": 128}}
    if block_size:
        data["kv_cache"]["block_size"] = block_size
    data.update(sections)
    return data


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """The demo checkpoint (tokenizer, chat template, generation_config.json), built once per session."""
    from moerun.runtime import demo

    folder = tmp_path_factory.mktemp("demo_checkpoint")
    demo.write_demo_checkpoint(folder)
    return folder


def make_request(params=None, prompt=(1, 2, 3), output=(), seed=0, stop=(), request_id="r", max_tokens=10_000):
    """A Request as the engine builds it (every sampling default filled), for unit tests of its parts."""
    from moerun.runtime.request import Request
    from moerun.runtime.sampling_params import GenerationDefaults, SamplingParams

    params = (params or SamplingParams()).with_defaults(GenerationDefaults())
    request = Request(request_id=request_id, prompt_token_ids=list(prompt), params=params, max_tokens=max_tokens,
                      stop_token_ids=frozenset(stop), seed=seed, arrival_time=0.0, detokenizer=None)
    request.token_ids.extend(output)
    return request
