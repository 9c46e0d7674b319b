"""The per-position figures of `moerun verify` (runtime/verify/topk.py) against their documented definition,
computed independently with torch: KL on the shared top-k support, each side renormalized over it; top-1 agreement
with ties counted as agreement; fewer than two shared tokens is infinitely far."""

from __future__ import annotations

import math

import pytest
import torch

from moerun.runtime.verify.topk import compare_position, median


def _top(logits: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    values, ids = torch.log_softmax(logits.double(), -1).topk(k)
    return ids.tolist(), values.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_kl_on_the_shared_support_as_defined(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(200, generator=gen) * 3
    b = a + 0.6 * torch.randn(200, generator=gen)  # close enough to share most of the top 20, not all
    (ids_a, lp_a), (ids_b, lp_b) = _top(a, 20), _top(b, 20)
    shared = sorted(set(ids_a) & set(ids_b))
    assert 2 <= len(shared) < 20
    p = torch.log_softmax(torch.log_softmax(a.double(), -1)[shared], -1)
    q = torch.log_softmax(torch.log_softmax(b.double(), -1)[shared], -1)
    expected = torch.sum(p.exp() * (p - q)).item()
    figures = compare_position(ids_a, lp_a, ids_b, lp_b, 20)
    assert figures.kl == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert figures.overlap == len(shared) / 20
    assert figures.top1 == (ids_a[0] == ids_b[0])


def test_identical_disjoint_and_truncated_lists():
    ids, lps = [5, 3, 9, 1], [-0.5, -1.5, -2.0, -4.0]
    same = compare_position(ids, lps, ids, lps, 4)
    assert (same.kl, same.top1, same.overlap) == (0.0, True, 1.0)
    apart = compare_position(ids, lps, [7, 8, 2, 4], lps, 4)
    assert (apart.kl, apart.top1, apart.overlap) == (math.inf, False, 0.0)
    # k = 2: only the first two of each list count (9 and 1 are not looked at)
    assert compare_position(ids, lps, [5, 3, 1, 9], [-0.1, -3.0, -3.1, -3.2], 2).overlap == 1.0


def test_a_tie_at_the_top_counts_as_agreement():
    ref_ids, ref_lps = [4, 6, 2], [-0.9, -1.2, -2.0]
    tied = compare_position(ref_ids, ref_lps, [6, 4, 2], [-1.0, -1.0 - 1e-7, -2.0], 3)  # 4 and 6 tied in the other
    assert tied.top1
    assert not compare_position(ref_ids, ref_lps, [6, 4, 2], [-1.0, -1.1, -2.0], 3).top1


def test_the_median_is_a_value_that_occurs():
    assert median([3.0, 1.0, math.inf, 2.0]) == 2.0  # the lower middle: an infinite tail does not leak in
    assert median([1.0, math.inf, math.inf]) == math.inf
