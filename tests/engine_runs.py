"""Helpers that drive an Engine the way a server does, for the model-level tests of every backend."""

from __future__ import annotations

import torch

from moerun.runtime.sampling_params import SamplingParams


def greedy_with_logprobs(engine, prompts: list[list[int]], steps: int, top: int = 20):
    """All prompts in flight at once, `steps` greedy tokens each; per prompt its tokens and logprob entries."""
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=top)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    tokens, entries = {rid: [] for rid in ids}, {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            entries[out.request_id] += out.new_logprobs
    return [tokens[rid] for rid in ids], [entries[rid] for rid in ids]


def against_full_prefill(engine, prompt: list[int], output: list[int], entries):
    """The decode steps' logprobs at their top ids, the same from one full prefill of prompt + output, that
    prefill's argmax per step, and its logit scale."""
    full = engine.logits(prompt + output[:-1])[len(prompt) - 1:]  # the rows that predicted each output token
    reference = full[:, :engine.sample_vocab_size].log_softmax(-1)
    ids = torch.tensor([[t for t, _ in e.top] for e in entries])
    got = torch.tensor([[v for _, v in e.top] for e in entries])
    return got, reference.gather(1, ids), reference.argmax(-1), full.abs().max()
