"""`moerun smoke`: the checks an operator or CI wants in seconds after pointing moerun at a checkpoint.

Prefill a small ragged batch, decode some steps, and check that logits are finite, that incremental decode over
the paged cache reproduces a full prefill of the same tokens, and that two runs are bit-identical."""

from __future__ import annotations

import dataclasses
import time

import torch

from moerun.runtime.batch import Sequence
from moerun.runtime.engine import Engine

# Incremental decode vs full prefill differ only by reduction order; the bound is relative to the logit scale.
DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


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


def _run(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor], float, float]:
    """Greedy prefill + decode. Returns the tokens, each step's logits [B, V], prefill and decode seconds."""
    seqs = [Sequence(list(p)) for p in prompts]
    step_logits = []
    try:
        t0 = time.perf_counter()
        logits = engine.step(seqs)
        engine.backend.synchronize()
        t1 = time.perf_counter()
        for _ in range(steps):
            step_logits.append(logits.cpu())
            for seq, token in zip(seqs, logits.argmax(-1).tolist()):
                seq.token_ids.append(token)
            logits = engine.step(seqs)
        engine.backend.synchronize()
        t2 = time.perf_counter()
        step_logits.append(logits.cpu())
        return [s.token_ids for s in seqs], step_logits, t1 - t0, t2 - t1
    finally:
        engine.release(seqs)


def run_smoke(engine: Engine, steps: int = 8) -> list[Check]:
    prompts = smoke_prompts(engine.config.vocab_size)
    checks = []
    tokens, step_logits, prefill_s, decode_s = _run(engine, prompts, steps)
    total = sum(map(len, prompts))
    finite = all(torch.isfinite(x).all().item() for x in step_logits)
    checks.append(Check("prefill finite", bool(torch.isfinite(step_logits[0]).all()),
                        f"{len(prompts)} seqs, {total} tokens", prefill_s))
    checks.append(Check("decode finite", finite, f"{steps} steps x {len(prompts)} seqs", decode_s))

    # Incremental decode vs one full prefill of the same final tokens.
    t0 = time.perf_counter()
    tolerance = DECODE_TOLERANCE[engine.backend.dtype]
    worst, same_argmax = 0.0, True
    for b, (prompt, seq_tokens) in enumerate(zip(prompts, tokens)):
        full = engine.logits(seq_tokens)  # rows len(prompt)-1 .. end are what prefill + decode steps predicted
        incremental = torch.stack([x[b] for x in step_logits])
        reference = full[len(prompt) - 1:]
        scale = reference.abs().max().item()
        worst = max(worst, (incremental - reference).abs().max().item() / scale)
        same_argmax &= bool((incremental.argmax(-1) == reference.argmax(-1)).all())
    checks.append(Check("decode == prefill", worst <= tolerance and same_argmax,
                        f"max diff {worst:.1e} of logit scale (<= {tolerance:.0e}), argmax {'same' if same_argmax else 'differs'}",
                        time.perf_counter() - t0))

    t0 = time.perf_counter()
    tokens2, step_logits2, _, _ = _run(engine, prompts, steps)
    identical = tokens2 == tokens and all(torch.equal(x, y) for x, y in zip(step_logits, step_logits2))
    checks.append(Check("deterministic", identical, "two runs bit-identical" if identical else "two runs differ",
                        time.perf_counter() - t0))
    return checks
