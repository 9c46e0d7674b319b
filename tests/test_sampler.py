"""The device sampler against the documented semantics, written out here independently (float64, one token at a
time): penalties as OpenAI/vLLM define them, then temperature, min_p, top_k, top_p (the token whose cumulative
probability crosses top_p is kept). Seeded draws are checked statistically and for independence from the batch."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_request

from moerun.runtime.sampler import Sampler
from moerun.runtime.sampling_params import GenerationDefaults, SamplingParams

VOCAB = 40


def reference_distribution(logits: np.ndarray, p: SamplingParams, prompt, output) -> np.ndarray:
    """The documented transformation, token by token."""
    logits = logits.astype(np.float64).copy()
    counts, seen = Counter(output), set(prompt) | set(output)
    for v in range(len(logits)):
        if v in seen:
            logits[v] = logits[v] / p.repetition_penalty if logits[v] > 0 else logits[v] * p.repetition_penalty
        logits[v] -= p.presence_penalty * (counts[v] > 0) + p.frequency_penalty * counts[v]
    out = np.zeros(len(logits))
    if p.temperature == 0:
        out[int(np.argmax(logits))] = 1.0
        return out
    scaled = logits / p.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = sorted(range(len(probs)), key=lambda v: -probs[v])
    kept = []
    for rank, v in enumerate(order):
        if p.top_k > 0 and rank >= p.top_k:
            break
        if probs[v] < p.min_p * probs[order[0]]:
            break
        kept.append(v)
    mass = sum(probs[v] for v in kept)
    final, total = [], 0.0
    for v in kept:  # top_p over what top_k and min_p left, renormalized
        final.append(v)
        total += probs[v] / mass
        if total >= p.top_p:
            break
    for v in final:
        out[v] = probs[v]
    return out / out.sum()


CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(temperature=1.0, top_k=5),
    "top_p": SamplingParams(temperature=1.0, top_p=0.6),
    "min_p": SamplingParams(temperature=1.3, min_p=0.2),
    "all_cuts": SamplingParams(temperature=0.8, top_k=12, top_p=0.75, min_p=0.05),
    "penalties": SamplingParams(temperature=1.0, repetition_penalty=1.7, presence_penalty=0.8, frequency_penalty=0.6),
    "penalties_and_cuts": SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=0.6, frequency_penalty=-0.4),
    "greedy_penalized": SamplingParams(temperature=0.0, repetition_penalty=3.0, presence_penalty=2.0),
}
OUTPUT = (7, 7, 9, 30, 7, 2)
PROMPT = (1, 2, 3, 9, 15)


def case_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.5


def assert_same_distribution(got: np.ndarray, want: np.ndarray) -> None:
    """Same support, and every probability to fp32 precision relative to itself (tiny ones included)."""
    assert np.array_equal(got > 0, want > 0), (got, want)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-30), (got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_reference(name):
    params = CASES[name].with_defaults(GenerationDefaults())
    logits = case_logits(len(name))
    sampler = Sampler(VOCAB, torch.device("cpu"), 4)
    got = sampler.distribution(logits[None], [make_request(params, PROMPT, OUTPUT)])[0].double().numpy()
    assert_same_distribution(got, reference_distribution(logits.numpy(), params, PROMPT, OUTPUT))


def test_rows_keep_their_own_parameters_in_one_batch():
    """Every case in one call: mixed greedy and drawn rows, top-k and no top-k, penalties on some rows."""
    sampler = Sampler(VOCAB, torch.device("cpu"), len(CASES))
    params = [p.with_defaults(GenerationDefaults()) for p in CASES.values()]
    logits = torch.stack([case_logits(len(n)) for n in CASES])
    got = sampler.distribution(logits, [make_request(p, PROMPT, OUTPUT) for p in params]).double().numpy()
    for row, p in enumerate(params):
        assert_same_distribution(got[row], reference_distribution(logits[row].numpy(), p, PROMPT, OUTPUT))


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(4, torch.device("cpu"), 1)
    for top_p, kept in [(0.5, 1), (0.5001, 2), (0.8, 2), (0.81, 3), (0.96, 4)]:
        probs = sampler.distribution(logits, [make_request(SamplingParams(temperature=1.0, top_p=top_p))])[0]
        assert int((probs > 0).sum()) == kept, (top_p, probs)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# chi-square quantiles at 0.999 (scipy.stats.chi2.ppf(0.999, df)): fixed seeds make the test deterministic, the
# quantile says how unlikely a failure of a correct sampler would be
CHI2_999 = {3: 16.27, 9: 27.88, 11: 31.26}


@pytest.mark.parametrize("params,df", [(SamplingParams(temperature=0.9), 11),
                                       (SamplingParams(temperature=1.0, top_k=4), 3)])
def test_seeded_draws_follow_the_distribution(params, df):
    """Many requests (seeds 0..N-1) and one request over many output positions: both match p."""
    vocab, n = 12, 3000
    params = params.with_defaults(GenerationDefaults())
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(vocab, torch.device("cpu"), n)
    probs = sampler.distribution(logits[None], [make_request(params)])[0].double().numpy()
    across_seeds = sampler(logits.expand(n, -1), [make_request(params, seed=s) for s in range(n)]).token_ids
    along_positions = sampler(logits.expand(n, -1),
                              [make_request(params, output=[0] * pos, seed=99) for pos in range(n)]).token_ids
    for tokens in (across_seeds, along_positions):
        counts = np.bincount(tokens, minlength=vocab)
        assert counts[probs == 0].sum() == 0
        stat, dof = chi_square(counts, probs)
        assert dof == df and stat < CHI2_999[df], (stat, counts, probs * n)


def test_a_seeded_row_draws_the_same_token_whatever_shares_the_batch():
    params = SamplingParams(temperature=1.0).with_defaults(GenerationDefaults())
    sampler = Sampler(VOCAB, torch.device("cpu"), 8)
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(5))
    mine = make_request(params, output=(4, 5), seed=1234)
    alone = sampler(logits[3:4], [mine]).token_ids[0]
    others = [make_request(params, seed=s) for s in range(7)]
    batched = sampler(logits, others[:3] + [mine] + others[3:]).token_ids
    assert batched[3] == alone


def test_ids_past_the_tokenizer_are_never_sampled():
    """A checkpoint's vocab_size padded past the tokenizer (M2: 200054..200063): those rows are masked out."""
    logits = torch.zeros(1, 12)
    logits[0, 8:] = 100.0
    sampler = Sampler(8, torch.device("cpu"), 1)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=2.0)):
        request = make_request(params.with_defaults(GenerationDefaults()))
        assert sampler(logits, [request]).token_ids[0] < 8
        assert sampler.distribution(logits, [request]).shape == (1, 8)


def test_stop_tokens_are_masked_until_min_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 50.0  # the stop token would always win
    sampler = Sampler(VOCAB, torch.device("cpu"), 1)
    params = SamplingParams(temperature=0, min_tokens=2).with_defaults(GenerationDefaults())
    early = make_request(params, output=(5,), stop={3})
    late = make_request(params, output=(5, 6), stop={3})
    assert sampler.distribution(logits, [early])[0, 3] == 0 and sampler(logits, [early]).token_ids[0] != 3
    assert sampler(logits, [late]).token_ids[0] == 3


def test_logprobs_are_log_softmax_of_the_raw_logits():
    sampler = Sampler(VOCAB, torch.device("cpu"), 2)
    logits = torch.randn(2, VOCAB + 4, generator=torch.Generator().manual_seed(8))
    requests = [make_request(SamplingParams(temperature=1.5, top_k=3, logprobs=5), seed=1),
                make_request(SamplingParams(temperature=0, logprobs=0, repetition_penalty=2.0))]
    out = sampler(logits, requests)
    reference = torch.log_softmax(logits[:, :VOCAB].double(), -1)
    for row, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry.token_id == token and math.isclose(entry.logprob, reference[row, token].item(), abs_tol=1e-5)
        top = reference[row].topk(requests[row].params.logprobs)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert np.allclose([v for _, v in entry.top], top.values.numpy(), atol=1e-5)
