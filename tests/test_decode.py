"""Incremental decode over the paged cache against one full prefill of the same tokens, on ragged batches."""

from __future__ import annotations

import pytest
import torch
from conftest import run_yaml

from moerun.runtime.batch import Sequence
from moerun.runtime.engine import Engine


def _continuations(engine, prompts, steps, chunk=None):
    """Feed prompts (optionally in prefill chunks), then `steps` forced tokens each, one decode step at a time.
    Returns per sequence the logits predicted at every position from len(prompt)-1 on."""
    gen = torch.Generator().manual_seed(11)
    forced = [torch.randint(0, engine.config.vocab_size, (steps,), generator=gen).tolist() for _ in prompts]
    seqs = [Sequence([]) for _ in prompts]
    collected = [[] for _ in prompts]
    # chunked prefill: every sequence advances by at most `chunk` tokens per step (a mixed batch)
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        active = []
        for i, p in enumerate(prompts):
            if done[i] < len(p):
                take = len(p) - done[i] if chunk is None else min(chunk, len(p) - done[i])
                seqs[i].token_ids.extend(p[done[i]:done[i] + take])
                done[i] += take
                active.append(i)
        logits = engine.step([seqs[i] for i in active])
        for row, i in enumerate(active):
            if done[i] == len(prompts[i]):
                collected[i].append(logits[row])
    for s in range(steps):
        for i, seq in enumerate(seqs):
            seq.token_ids.append(forced[i][s])
        logits = engine.step(seqs)
        for i in range(len(seqs)):
            collected[i].append(logits[i])
    tokens = [list(s.token_ids) for s in seqs]
    engine.release(seqs)
    return tokens, [torch.stack(c) for c in collected]


@pytest.mark.parametrize("block_size,chunk", [(16, None), (32, None), (16, 5)], ids=["bs16", "bs32", "chunked"])
def test_incremental_decode_matches_full_prefill(block_size, chunk, hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder, block_size=block_size)))
    prompts = [[5, 6, 7], list(range(10, 50)), [200, 1], list(range(100, 117))]  # ragged; crosses block edges
    tokens, incremental = _continuations(engine, prompts, steps=20, chunk=chunk)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # everything released
    for prompt, seq_tokens, inc in zip(prompts, tokens, incremental):
        full = engine.logits(seq_tokens)[len(prompt) - 1:]
        assert (inc - full).abs().max() <= 1e-4 * full.abs().max()
        assert torch.equal(inc.argmax(-1), full.argmax(-1))


def test_batch_composition_does_not_change_results(hf_checkpoint, write_yaml):
    """A sequence's logits do not depend on which other sequences share its step."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = Engine.from_config(write_yaml(run_yaml(folder)))
    alone = engine.logits(list(range(30, 60)))
    seqs = [Sequence([1, 2, 3]), Sequence(list(range(30, 60))), Sequence([9] * 17)]
    together = engine.step(seqs, all_logits=True)[3:33]
    engine.release(seqs)
    assert (alone - together).abs().max() <= 1e-5 * alone.abs().max()


def test_kv_cache_exhaustion_is_a_clear_error(hf_checkpoint, write_yaml):
    from moerun.backends.errors import MoerunError

    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    data = run_yaml(folder)
    data["kv_cache"]["num_blocks"] = 2
    engine = Engine.from_config(write_yaml(data))
    with pytest.raises(MoerunError, match="KV cache full.*kv_cache.num_blocks"):
        engine.logits(list(range(40)))
