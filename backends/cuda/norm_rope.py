"""RMSNorm (optionally fused with the residual add) and partial NeoX rotary, one Triton kernel each.

Both follow the reference's rounding step by step (moerun.backends.cpu.ops, i.e. transformers): statistics in
fp32, the normalized value rounded to the input dtype before the weight multiplies it; the rotary products
rounded to the model dtype before they are added. So in bf16 the kernels differ from the reference only where
fp32 sums are ordered differently."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.backends.cuda.triton_utils import next_pow2, round_as, rows_per_program, to_dtype


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_rows, n_cols, stride_x, stride_r, stride_o, stride_s,
                     eps, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_as(x + r, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows * stride_s + cols, to_dtype(x, sum_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = round_as(x * rstd[:, None], x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_o + cols, to_dtype(normed * w, out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_norm(x2, r2, weight, out, summed, eps, has_residual: bool) -> None:
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    rows = rows_per_program(n_rows)
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, weight, out, summed, n_rows, n_cols, x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0), eps,
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK=next_pow2(n_cols),
        num_warps=4 if n_cols <= 2048 else (8 if n_cols <= 8192 else 16))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    _launch_norm(x2, x2, weight, out, out, eps, has_residual=False)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x's dtype as torch's add does."""
    x2, r2 = _rows(x), _rows(residual)
    summed = torch.empty(x2.shape, dtype=torch.result_type(x, residual), device=x.device)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, summed), device=x.device)
    _launch_norm(x2, r2, weight, out, summed, eps, has_residual=True)
    return out.view(x.shape), summed.view(x.shape)


@triton.jit
def _rotary_heads(x_ptr, o_ptr, c, s, t, t_ok, num_heads, stride_xt, stride_xh, stride_ot, stride_oh, head_dim, rot,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens t [ROWS, 1, 1] x heads [H] x dims [D]: NeoX rotation of dims < rot (element i pairs with
    i + rot/2), the other dims copied."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    half = rot // 2
    mask = t_ok & (h < num_heads) & (d < head_dim)
    partner = tl.where(d < half, d + half, d - half)
    base = x_ptr + t * stride_xt + h * stride_xh
    x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    other = tl.load(base + partner, mask=mask & (d < rot), other=0.0).to(tl.float32)
    rotated = tl.where(d < half, -other, other)  # rotate_half(x) = cat(-x2, x1)
    dtype = o_ptr.dtype.element_ty
    out = round_as(x * c, dtype) + round_as(rotated * s, dtype)
    out = tl.where(d < rot, out, x)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, to_dtype(out, dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, num_tokens, num_q_heads, num_k_heads, head_dim, rot,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_ct, stride_st, ROWS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]
    t_ok = t < num_tokens
    d = tl.arange(0, BLOCK_D)[None, None, :]
    c = tl.load(cos_ptr + t * stride_ct + d, mask=t_ok & (d < rot), other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + d, mask=t_ok & (d < rot), other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _rotary_heads(q_ptr, qo_ptr, c, s, t, t_ok, num_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh, head_dim,
                      rot, BLOCK_HQ, BLOCK_D)
    else:
        _rotary_heads(k_ptr, ko_ptr, c, s, t, t_ok, num_k_heads, stride_kt, stride_kh, stride_kot, stride_koh, head_dim,
                      rot, BLOCK_HK, BLOCK_D)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], cos/sin [T, rot] -> rotated copies of q and k."""
    num_tokens, num_q, head_dim = q.shape
    num_k, rot = k.shape[1], cos.shape[-1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        rows = rows_per_program(num_tokens)
        _rotary_kernel[(triton.cdiv(num_tokens, rows), 2)](
            q, k, cos, sin, q_out, k_out, num_tokens, num_q, num_k, head_dim, rot,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
            ROWS=rows, BLOCK_HQ=next_pow2(num_q), BLOCK_HK=next_pow2(num_k), BLOCK_D=next_pow2(head_dim), num_warps=4)
    return q_out, k_out
