"""The CPU reference W8A8 arithmetic (backends/cpu/w8a8.py) against integer math written independently in numpy:
int64 dot products, a loop over every token and each of its k experts, float32 scale products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moerun.backends.base import W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu import w8a8

rng = np.random.default_rng(0)


def np_quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: scale = max|x| / 127 in float32 (1 for an all-zero row), q = round half to even of x / scale."""
    x = x.astype(np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    return np.clip(np.rint(x / scale[:, None]), -128, 127).astype(np.int64), scale


def np_silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def random_int8(*shape) -> np.ndarray:
    return rng.integers(-127, 128, size=shape).astype(np.int8)


def random_scales(*shape) -> np.ndarray:
    return rng.uniform(2e-3, 2e-2, size=shape).astype(np.float32)


def test_quantize_rows_rounds_half_to_even_and_clamps():
    # max |x| = 127 gives scale 1, so every quotient is exact: the ties show the rounding rule.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = w8a8.quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0].tolist() == [127, 0, 2, 2, -2, 0, 126]  # half away from zero would give 1, 3, -3, -1, 127
    assert q[1].tolist() == [0] * 7 and scale.tolist() == [1.0, 1.0]  # an all-zero row: zeros, scale 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_rows_matches_numpy(dtype):
    x = torch.from_numpy(rng.standard_normal((9, 40)).astype(np.float32) * 3).to(dtype)
    q, scale = w8a8.quantize_rows(x)
    q_np, scale_np = np_quantize_rows(x.float().numpy())
    assert np.array_equal(q.numpy(), q_np) and np.array_equal(scale.numpy(), scale_np)
    assert q.abs().max() == 127  # the row maximum lands on +-127


def test_int8_matmul_is_exact_at_the_extremes():
    a = np.full((2, 4096), -128, dtype=np.int8)
    b = np.full((3, 4096), -128, dtype=np.int8)
    out = w8a8.int8_matmul(torch.from_numpy(a), torch.from_numpy(b))
    assert out.dtype == torch.int32 and out.unique().tolist() == [128 * 128 * 4096]  # 2^26: beyond fp32's 2^24
    a, b = random_int8(5, 300), random_int8(7, 300)
    assert np.array_equal(w8a8.int8_matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                          a.astype(np.int64) @ b.astype(np.int64).T)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.bfloat16, 2 ** -8)], ids=["fp32", "bf16"])
def test_linear_matches_integer_math(dtype, tol):
    x = rng.standard_normal((6, 48)).astype(np.float32)
    weight, scale = random_int8(20, 48), random_scales(20)
    out = w8a8.linear(torch.from_numpy(x).to(dtype), W8A8LinearWeight(torch.from_numpy(weight), torch.from_numpy(scale)))
    q, s = np_quantize_rows(torch.from_numpy(x).to(dtype).float().numpy())
    expected = (q @ weight.astype(np.int64).T).astype(np.float32) * scale[None, :] * s[:, None]
    assert out.dtype == dtype
    assert np.abs(out.float().numpy() - expected).max() <= tol * np.abs(expected).max()


def np_experts(x, weights, ids, w13, s13, w2, s2):
    """Token by token, expert by expert, in the documented order of rounding points (float32 x)."""
    inter = w2.shape[-1]
    q, s = np_quantize_rows(x)
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            gate_up = (q[t] @ w13[e].astype(np.int64).T).astype(np.float32) * s13[e] * s[t]
            h = np_silu(gate_up[:inter]) * gate_up[inter:]
            hq, hs = np_quantize_rows(h[None, :].astype(np.float32))
            down = (hq[0] @ w2[e].astype(np.int64).T).astype(np.float32) * s2[e] * hs[0]
            out[t] += weights[t, j] * down
    return out


def test_experts_match_a_token_by_token_loop():
    tokens, experts, hidden, inter, k = 11, 6, 32, 24, 2
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)])
    ids[:, 0] = 3  # one expert sees every token; with 6 experts and k = 2, some see none
    weights = rng.dirichlet(np.ones(k), size=tokens).astype(np.float32)
    w13, s13, w2, s2 = random_int8(experts, 2 * inter, hidden), random_scales(experts, 2 * inter), \
        random_int8(experts, hidden, inter), random_scales(experts, hidden)
    ew = W8A8ExpertWeights(*(torch.from_numpy(a) for a in (w13, s13, w2, s2)))
    out = w8a8.experts(torch.from_numpy(x), torch.from_numpy(weights), torch.from_numpy(ids).to(torch.int32), ew)
    expected = np_experts(x, weights, ids, w13, s13, w2, s2)
    assert out.dtype == torch.float32 and np.abs(out.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_bfloat16_down_scale_is_rounded_to_bfloat16():
    """The per-token grouped matmul takes a bf16 weight scale for bf16 outputs: the reference rounds there too."""
    assert w8a8.down_scale_dtype(torch.bfloat16) == torch.bfloat16
    assert w8a8.down_scale_dtype(torch.float16) == w8a8.down_scale_dtype(torch.float32) == torch.float32

