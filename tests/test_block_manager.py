"""The block manager on its own: reference counts, the free queue's order, prefix-cache hashing and its guards."""

from __future__ import annotations

import hashlib
import struct

from conftest import make_request

from moerun.runtime import block_manager as bm_module
from moerun.runtime.block_manager import ROOT_HASH, BlockManager, block_hash

BS = 4


def computed(manager: BlockManager, request, num_tokens: int | None = None):
    """Allocate for, 'compute' and register request's tokens, as a step would."""
    num_tokens = request.num_tokens if num_tokens is None else num_tokens
    cached = manager.find_cached_prefix(request)
    assert manager.allocate(request, num_tokens, cached)
    request.num_computed_tokens = num_tokens
    manager.cache_full_blocks(request)
    return cached


def test_the_hash_is_sha256_of_the_parent_and_int64_tokens():
    tokens = [1, 2, 70000, 3]
    expected = hashlib.sha256(ROOT_HASH + struct.pack("<4q", *tokens)).digest()
    assert block_hash(ROOT_HASH, tokens) == expected
    assert block_hash(expected, tokens) != expected  # chained: the same tokens under another parent differ


def test_shared_prefix_blocks_are_reused_and_reference_counted():
    manager = BlockManager(16, BS)
    a = make_request(prompt=list(range(10)), request_id="a")  # blocks: [0..3] [4..7] and a partial [8, 9]
    computed(manager, a)
    b = make_request(prompt=list(range(8)) + [50, 51, 52], request_id="b")
    blocks, hashes = computed(manager, b)
    assert blocks == a.block_ids[:2] and hashes == a.block_hashes[:2]
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]  # the partial block is never shared
    assert [manager.ref_counts[x] for x in a.block_ids] == [2, 2, 1]
    manager.free(a)
    assert [manager.ref_counts[x] for x in b.block_ids] == [1, 1, 1]
    assert manager.num_used_blocks == 3
    manager.free(b)
    assert manager.num_free_blocks == 16


def test_the_last_prompt_token_is_always_recomputed():
    manager = BlockManager(16, BS)
    computed(manager, make_request(prompt=list(range(12)), request_id="a"))
    same = make_request(prompt=list(range(8)), request_id="b")  # two full blocks, both cached
    assert len(manager.find_cached_prefix(same)[0]) == 1  # the block holding the last token is recomputed


def test_a_hash_collision_never_hands_out_other_tokens(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: b"same")
    manager = BlockManager(16, BS)
    computed(manager, make_request(prompt=list(range(9)), request_id="a"))
    other = make_request(prompt=[9, 9, 9, 9, 9], request_id="b")
    assert manager.find_cached_prefix(other) == ([], [])


def test_freed_blocks_keep_their_prefix_and_are_evicted_least_recently_freed_first():
    manager = BlockManager(6, BS)
    a = make_request(prompt=list(range(12)), request_id="a")  # three full blocks: 0, 1, 2
    computed(manager, a)
    assert a.block_ids == [0, 1, 2]
    manager.free(a)  # queue: 3 4 5 (never used), then a's tail first: 2 1 0
    c = make_request(prompt=list(range(9)), request_id="c")
    assert manager.find_cached_prefix(c)[0] == [0, 1]  # revivable while still in the free queue
    d = make_request(prompt=[100 + i for i in range(16)], request_id="d")
    assert manager.allocate(d, 16)
    assert d.block_ids == [3, 4, 5, 2]  # the never used first, then a's tail; a's head survives
    blocks, _ = computed(manager, c, num_tokens=8)  # the two cached blocks (its last token would need a third)
    assert blocks == [0, 1] and manager.ref_counts[0] == manager.ref_counts[1] == 1
    assert manager.num_free_blocks == 0


def test_a_failed_allocation_changes_nothing():
    manager = BlockManager(4, BS)
    a = make_request(prompt=list(range(8)), request_id="a")
    computed(manager, a)
    b = make_request(prompt=list(range(20)), request_id="b")
    before = (list(manager.ref_counts), manager.num_free_blocks)
    assert not manager.allocate(b, 20, manager.find_cached_prefix(b))
    assert b.block_ids == [] and (list(manager.ref_counts), manager.num_free_blocks) == before


def test_prefix_caching_off_and_prompt_logprob_requests_never_hit():
    manager = BlockManager(16, BS, enable_prefix_caching=False)
    computed(manager, make_request(prompt=list(range(12)), request_id="a"))
    assert manager.find_cached_prefix(make_request(prompt=list(range(12)), request_id="b")) == ([], [])
    from moerun.runtime.sampling_params import SamplingParams

    manager = BlockManager(16, BS)
    computed(manager, make_request(prompt=list(range(12)), request_id="a"))
    echo = make_request(SamplingParams(prompt_logprobs=1), prompt=list(range(12)), request_id="b")
    assert manager.find_cached_prefix(echo) == ([], [])  # every prompt position's logits are needed


def test_reset_forgets_every_prefix():
    manager = BlockManager(16, BS)
    a = make_request(prompt=list(range(12)), request_id="a")
    computed(manager, a)
    manager.free(a)
    manager.reset_prefix_cache()
    assert manager.find_cached_prefix(make_request(prompt=list(range(12)), request_id="b")) == ([], [])
