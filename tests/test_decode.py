"""Decode over the paged cache, through the engine's scheduler and sampler, against one full prefill of the same
tokens (transformers-checked by tests/test_hf_parity.py): ragged batches, block edges, chunked mixed steps."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml
from engine_runs import against_full_prefill, greedy_with_logprobs

from moerun.runtime.engine import Engine
from moerun.runtime.sampling_params import RequestError

PROMPTS = [[5, 6, 7], list(range(10, 50)), [200, 1], list(range(100, 117))]  # ragged; crosses block edges


def assert_logprobs_match_full_prefill(engine, prompt, output, entries, tolerance):
    got, want, argmax, scale = against_full_prefill(engine, prompt, output, entries)
    assert output == argmax.tolist() == [e.token_id for e in entries]
    assert (got - want).abs().max() <= tolerance * scale


@pytest.mark.parametrize("block_size,batched_tokens", [(16, 2048), (32, 2048), (16, 5)], ids=["bs16", "bs32", "chunked"])
def test_incremental_decode_matches_full_prefill(block_size, batched_tokens, hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder, block_size=block_size,
                                                    scheduler={"max_num_batched_tokens": batched_tokens})))
    outputs, entries = greedy_with_logprobs(engine, PROMPTS, steps=20)
    assert engine.stats().kv_blocks_used == 0  # everything released
    for prompt, output, seq_entries in zip(PROMPTS, outputs, entries):
        assert len(output) == 20
        assert_logprobs_match_full_prefill(engine, prompt, output, seq_entries, 1e-4)


def test_batch_composition_does_not_change_results(hf_checkpoint, write_yaml):
    """A request's tokens and logprobs do not depend on which other requests share its steps."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder)))
    alone_tokens, alone_entries = greedy_with_logprobs(engine, [list(range(30, 60))], steps=12)
    tokens, entries = greedy_with_logprobs(engine, [[1, 2, 3], list(range(30, 60)), [9] * 17], steps=12)
    assert tokens[1] == alone_tokens[0]
    for a, b in zip(alone_entries[0], entries[1]):
        assert abs(a.logprob - b.logprob) <= 1e-5


def test_a_request_larger_than_the_cache_is_refused_at_add_time(hf_checkpoint, write_yaml):
    """Without scheduler.max_model_len the context limit is what the cache holds (2 blocks of 16 here)."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    data = run_yaml(folder)
    data["kv_cache"]["num_blocks"] = 2
    engine = Engine.from_config(write_yaml(data))
    assert engine.max_model_len == 32
    with pytest.raises(RequestError, match=r"maximum context length is 32 tokens\. However, you requested 40 tokens"):
        engine.logits(list(range(40)))
    assert not engine.has_unfinished_requests()
