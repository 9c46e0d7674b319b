"""W8A8 op cases shared by the emulated Ascend backend tests (tests/test_ascend_backend_ops.py) and the real-NPU
ones (tests/ascend/test_npu_w8a8.py): each builds its inputs deterministically, on the CPU, from its name, so both
run exactly the same numbers against the CPU reference (moerun.backends.cpu.w8a8)."""

from __future__ import annotations

import torch

from moerun.backends.base import W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.w8a8 import quantize_rows

# name: (tokens, in, out)
LINEAR_CASES = {
    "prefill": (19, 128, 96),
    "decode token": (1, 128, 96),
    "wide output": (5, 64, 384),
}

# name: (tokens, experts, top_k, hidden, intermediate, route)
EXPERT_CASES = {
    "every expert": (12, 8, 2, 64, 64, "every"),
    "some experts get none": (11, 8, 2, 64, 64, "sparse"),
    "one expert gets every token": (9, 8, 3, 64, 64, "one"),
    "intermediate padded to 64": (10, 6, 2, 64, 40, "every"),
    "decode token": (1, 8, 2, 64, 64, "every"),
}


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(map(ord, name)))


def _quantized(gen: torch.Generator, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float weights [..., out, in] quantized per output channel, as a W8A8 export holds them."""
    w = torch.randn(*shape, generator=gen) * shape[-1] ** -0.5
    q, scale = quantize_rows(w.reshape(-1, shape[-1]))
    return q.reshape(shape), scale.reshape(shape[:-1])


def linear_case(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, W8A8LinearWeight]:
    gen = _generator(name)
    tokens, inp, out = LINEAR_CASES[name]
    x = (2 * torch.randn(tokens, inp, generator=gen)).to(dtype)
    return x, W8A8LinearWeight(*_quantized(gen, out, inp))


def expert_case(name: str, dtype: torch.dtype):
    """-> (x [T, H], weights fp32 [T, k], ids int32 [T, k], W8A8ExpertWeights)."""
    gen = _generator(name)
    tokens, experts, top_k, hidden, inter, route = EXPERT_CASES[name]
    if route == "every":
        ids = torch.arange(tokens * top_k).view(tokens, top_k) % experts
    elif route == "sparse":  # experts 0, 2, 4 only
        ids = torch.stack([torch.randperm(3, generator=gen)[:top_k] * 2 for _ in range(tokens)])
    else:  # expert 0 for every token, the others random
        ids = torch.cat([torch.zeros(tokens, 1, dtype=torch.long),
                         torch.stack([torch.randperm(experts - 1, generator=gen)[:top_k - 1] + 1
                                      for _ in range(tokens)])], dim=1)
    x = (2 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    w13, s13 = _quantized(gen, experts, 2 * inter, hidden)
    w2, s2 = _quantized(gen, experts, hidden, inter)
    return x, weights, ids.to(torch.int32), W8A8ExpertWeights(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)
