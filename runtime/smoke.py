"""`moerun smoke`: the checks an operator or CI wants in seconds after pointing moerun at a checkpoint.

Prefill a small ragged batch, decode some steps, and check that logits are finite, that incremental decode over
the paged cache reproduces a full prefill of the same tokens, and that two runs are bit-identical."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from moerun.runtime.engine import Engine
from moerun.runtime.request import LogprobEntry
from moerun.runtime.sampling_params import SamplingParams

# Incremental decode vs full prefill differ only by reduction order; the bound is relative to the logit scale.
DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TOP = 20  # logprobs compared per step


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float


PROMPT_LENGTHS = (5, 11, 17)  # a ragged batch: three sequences, none a multiple of a block


def smoke_prompts(vocab_size: int, lengths: tuple[int, ...] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _run(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[list[LogprobEntry]], float, float]:
    """Greedy prefill + `steps` decode steps through the engine. Returns each sequence's tokens, each sequence's
    logprob entries (one per generated token), prefill and decode seconds."""
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, logprobs=min(TOP, engine.sample_vocab_size))
    ids = [f"smoke-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    entries: dict[str, list[LogprobEntry]] = {rid: [] for rid in ids}
    t0 = time.perf_counter()
    timings = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            entries[out.request_id] += out.new_logprobs
        engine.backend.synchronize()
        timings.append(time.perf_counter() - t0)
    return ([p + outputs[rid] for p, rid in zip(prompts, ids)], [entries[rid] for rid in ids],
            timings[0], timings[-1] - timings[0])


def run_smoke(engine: Engine, steps: int = 8) -> list[Check]:
    prompts = smoke_prompts(engine.config.vocab_size)
    checks = []
    tokens, entries, prefill_s, decode_s = _run(engine, prompts, steps)
    total = sum(map(len, prompts))

    def finite(rows: list[LogprobEntry]) -> bool:
        return all(math.isfinite(e.logprob) and all(math.isfinite(v) for _, v in e.top) for e in rows)

    checks.append(Check("prefill finite", all(finite(e[:1]) for e in entries), f"{len(prompts)} seqs, {total} tokens",
                        prefill_s))
    checks.append(Check("decode finite", all(finite(e[1:]) for e in entries), f"{steps} steps x {len(prompts)} seqs",
                        decode_s))

    # Incremental decode vs one full prefill of the same final tokens.
    t0 = time.perf_counter()
    tolerance = DECODE_TOLERANCE[engine.backend.dtype]
    worst, same_argmax = 0.0, True
    for prompt, seq_tokens, seq_entries in zip(prompts, tokens, entries):
        # rows len(prompt)-1 .. are what the prefill and decode steps predicted (the last token is never fed)
        full = engine.logits(seq_tokens[:-1])[len(prompt) - 1:]
        reference = torch.log_softmax(full[:, :engine.sample_vocab_size], dim=-1)
        scale = full.abs().max().item()
        for row, entry in zip(reference, seq_entries):
            ids = torch.tensor([t for t, _ in entry.top])
            got = torch.tensor([v for _, v in entry.top])
            worst = max(worst, (got - row[ids]).abs().max().item() / scale)
            same_argmax &= entry.token_id == int(row.argmax())
    checks.append(Check("decode == prefill", worst <= tolerance and same_argmax,
                        f"max diff {worst:.1e} of logit scale (<= {tolerance:.0e}), argmax {'same' if same_argmax else 'differs'}",
                        time.perf_counter() - t0))

    t0 = time.perf_counter()
    engine.reset_prefix_cache()  # the second run must compute exactly what the first did
    tokens2, entries2, _, _ = _run(engine, prompts, steps)
    identical = tokens2 == tokens and entries2 == entries
    checks.append(Check("deterministic", identical, "two runs bit-identical" if identical else "two runs differ",
                        time.perf_counter() - t0))
    return checks
