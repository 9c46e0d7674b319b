"""kv_cache.num_blocks unset: the engine sizes its cache before loading, from the free memory it finds and the
weights it is about to load, by the arithmetic of `moerun plan` (runtime/capacity.py), checked here against that
arithmetic written out by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml

from moerun.backends.errors import ConfigError, ResourceError
from moerun.runtime import model_runner
from moerun.runtime.engine import Engine

GB = 10**9


# gqa4_half_rope in float32: 2 layers (norms, q/k/v/o, QK-norms, router and bias, 8 experts of 32), embedding and
# lm_head of 211 x 64, final norm
LAYER = 64 + 128 * 64 + 2 * 32 * 64 + 64 * 128 + 128 + 32 + 64 + 8 * 64 + 8 + 8 * 3 * 32 * 64
WEIGHTS = 4 * (2 * LAYER + 2 * 211 * 64 + 64)


def free_memory_of(monkeypatch, before: int) -> None:
    """The device reports `before` bytes free (the runner reads it once, before loading)."""
    monkeypatch.setattr(model_runner, "memory_free", lambda backend: before)


def sized_yaml(folder, **scheduler) -> dict:
    data = run_yaml(folder, block_size=16, scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 64, **scheduler})
    del data["kv_cache"]["num_blocks"]
    data["kv_cache"]["memory_fraction"] = 0.5
    return data


def test_blocks_from_free_memory_by_hand(hf_checkpoint, write_yaml, monkeypatch):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)  # 2 layers, 2 KV heads of 16, fp32, top-2 of 8
    before = 2_200_000
    free_memory_of(monkeypatch, before)
    engine = Engine.from_config(write_yaml(sized_yaml(folder, max_model_len=256)))
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x fp32
    h, q, kv, inter = 64, 8 * 16, 2 * 16, 32
    activations = 64 * (4 * (3 * h + 2 * q + 2 * kv + 2 * (3 * inter + h)) + 4 * 8) + 4 * 4 * (211 + 211)
    tokens = (before // 2 - WEIGHTS - activations) // per_token  # no workspace on the CPU
    assert engine.runner.num_blocks == tokens // 16
    assert tokens // 16 < 4 * 256 // 16 and engine.max_model_len == 256  # below the cap; the cache holds 256


def test_blocks_stop_at_what_the_requests_could_hold(hf_checkpoint, write_yaml, monkeypatch):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    free_memory_of(monkeypatch, 100 * GB)
    engine = Engine.from_config(write_yaml(sized_yaml(folder)))
    assert engine.runner.num_blocks == 4 * (512 // 16)  # max_num_seqs x the model's 512 positions


def test_no_room_for_the_cache_is_one_line(hf_checkpoint, write_yaml, monkeypatch):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    free_memory_of(monkeypatch, 2 * WEIGHTS)  # half of it, x memory_fraction 0.5, leaves no room beside the reserve
    with pytest.raises(ResourceError, match="no memory left for the KV cache"):
        Engine.from_config(write_yaml(sized_yaml(folder)))


def test_max_model_len_the_sized_cache_cannot_hold_is_refused_before_loading(hf_checkpoint, write_yaml, monkeypatch):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    free_memory_of(monkeypatch, 2_000_000)
    monkeypatch.setattr(model_runner.WeightLoader, "load", lambda *a: pytest.fail("loaded before refusing"))
    with pytest.raises(ConfigError, match="512 tokens do not fit the KV cache .* what fits in kv_cache.memory_fraction"):
        Engine.from_config(write_yaml(sized_yaml(folder, max_model_len=512)))


def test_weights_that_do_not_fit_are_named_before_the_cache_is_sized(hf_checkpoint, write_yaml, monkeypatch):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    free_memory_of(monkeypatch, WEIGHTS - 1)
    monkeypatch.setattr(model_runner.WeightLoader, "load", lambda *a: pytest.fail("loaded before refusing"))
    with pytest.raises(ResourceError, match=f"the weights of 2 layers need {WEIGHTS / 1e6:.1f} MB on cpu"):
        Engine.from_config(write_yaml(sized_yaml(folder)))
