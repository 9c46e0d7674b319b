"""Figures between two top-k lists of one position, as an endpoint returns them (token ids with logprobs, most
likely first): KL on their shared support and top-1 agreement. The floor (a second faithful configuration against
the reference) and the endpoint are measured by this same function, on the same k, so they compare.

KL on the shared support: each list's probabilities over the tokens both lists hold, renormalized, then
KL(reference || other). Renormalizing drops each list's unknown tail (and any normalization difference between a
server's log-softmax and the reference's); what a list does not share counts through `overlap`. With fewer than
two shared tokens there is no distribution to compare: the position is infinitely far (the median of a faithful
run never sees one: its lists share nearly all their tokens).

Top-1 agreement counts a tie as agreement: a 16-bit run's logits are often exactly tied at the top, and which of
the tied tokens a sort puts first is not the model's choice. Tied means within TIE of the top logprob (the
manifest keeps logprobs to 1e-6, so two equal values may read up to 1e-6 apart)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

TIE = 2e-6


@dataclasses.dataclass(frozen=True)
class PositionFigures:
    kl: float  # nats; math.inf with fewer than 2 shared tokens
    top1: bool  # the most likely tokens agree
    overlap: float  # shared tokens / k


def compare_position(ref_ids: Sequence[int], ref_logprobs: Sequence[float], ids: Sequence[int],
                     logprobs: Sequence[float], k: int) -> PositionFigures:
    """The first k entries of each list (both sorted most likely first)."""
    ref = dict(zip(ref_ids[:k], ref_logprobs[:k]))
    other = dict(zip(ids[:k], logprobs[:k]))
    shared = [t for t in ref if t in other]
    top1 = _tied_first(ref, ref_logprobs[0], ids[0]) or _tied_first(other, logprobs[0], ref_ids[0])
    overlap = len(shared) / k
    if len(shared) < 2:
        return PositionFigures(math.inf, top1, overlap)
    p, q = _normalized([ref[t] for t in shared]), _normalized([other[t] for t in shared])
    kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(p, q))
    return PositionFigures(max(kl, 0.0), top1, overlap)


def _tied_first(top: dict[int, float], first: float, token: int) -> bool:
    """`token` is first in `top` (whose first logprob is `first`), or tied with the first."""
    return token in top and top[token] >= first - TIE


def _normalized(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    log_total = top + math.log(sum(math.exp(v - top) for v in logprobs))
    return [v - log_total for v in logprobs]


def median(values: Sequence[float]) -> float:
    """The lower median (a value that occurs), so an infinite tail beyond the middle does not leak in."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else math.nan
