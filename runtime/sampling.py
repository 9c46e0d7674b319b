"""Next-token choice from fp32 logits: greedy at temperature 0, else temperature / top-k / top-p sampling
from a seeded generator (so --seed reproduces a run)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_tokens: int = 32


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """logits fp32 [B, V] (any device) -> one token id per row."""
    logits = logits.float().cpu()
    if params.temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
