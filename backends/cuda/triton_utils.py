"""Helpers every Triton kernel of the CUDA backend shares: rounding to the output dtype, the matmul step, and
whether the kernels run compiled on a GPU or under Triton's CPU interpreter (TRITON_INTERPRET=1, used by CI).

Three interpreter defects are worked around here, and only under the interpreter, so the compiled kernels are
untouched (triton 3.9 and 3.6, checked when this was written):
- its float downcast truncates (fp32 -> bf16) or mis-rounds (fp32 -> fp8 e4m3, even with rounding="rtne"), while
  GPUs round to nearest even. Casting an already representable value is exact there, so `to_dtype` first rounds
  on the fp32 bits; interpreted outputs are then bit-identical to torch's casts.
- `tl.dot` of bfloat16 operands returns garbage. `mma` feeds it fp32 copies instead, which is exact: a product of
  two bf16 (or fp8) values fits in fp32, so only the accumulation order can differ from the GPU's.
- a loop bound that is a tensor (a kernel argument, a loaded length) reaches Python's `range` through the
  interpreter's `tensor.__index__`. The interpreter holds scalars as numpy arrays of shape (1,); Triton 3.6's
  `__index__` is `int(array)`, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
  scalars", triton-lang/triton#9171; 3.9 squeezes first). The compiled kernel is not affected (the bound becomes
  an scf.for operand). Every kernel loop with a tensor bound therefore goes through `loop_bound`.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton import knobs

    INTERPRETING: bool = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4 reads the variable directly
    INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INTERPRETING = tl.constexpr(INTERPRETING)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The smallest K of an fp8 tl.dot NVIDIA's compiler accepts (triton/backends/nvidia/compiler.py: min_dot_size)
FP8_DOT_MIN_K = tl.constexpr(32)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def rows_per_program(num_rows: int) -> int:
    """Row-wise kernels take one row per program on a GPU. The interpreter pays milliseconds per program, so
    there each program takes many rows (same kernel code, a wider ROWS tile)."""
    return min(next_pow2(num_rows), 32) if INTERPRETING else 1


if INTERPRETING:

    def loop_bound(x):
        """A Python int for the interpreter's `range` (see the module docstring)."""
        return x.handle.data.item() if isinstance(x, tl.tensor) else x

else:

    @triton.jit
    def loop_bound(x):
        return x


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even (the GPU's and torch's rounding)."""
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        elif dtype == tl.float8e4nv:
            # normal range: keep 3 mantissa bits; subnormals (|x| < 2^-6) are multiples of 2^-9
            bits = x.to(tl.uint32, bitcast=True)
            normal = ((bits + (0x7FFFF + ((bits >> 20) & 1))) & 0xFFF00000).to(tl.float32, bitcast=True)
            subnormal = (x + 24576.0) - 24576.0  # 24576 = 1.5 * 2^(23 - 9): fp32 addition rounds to 2^-9
            x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(dtype)


@triton.jit
def round_as(x, dtype: tl.constexpr):
    """fp32 x rounded to dtype and back: mimics a torch op whose result is stored in dtype."""
    return to_dtype(x, dtype).to(tl.float32)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation; fp32 operands in full precision (no TF32)."""
    if _INTERPRETING:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif a.dtype.is_fp8() and a.shape[1] < FP8_DOT_MIN_K:
        # NVIDIA's compiler refuses fp8 dots with K < 32 (triton/backends/nvidia/compiler.py: min_dot_size); every
        # e4m3 / e5m2 value is exact in fp16, so the products (and the fp32 sums) are the same
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def div_exact(x, y):
    """x / y rounded to nearest. On NVIDIA, Triton's fp32 `/` is div.full.f32 (approximate); the interpreter's
    `/` is numpy's exact one (and its div_rn is not exact)."""
    if _INTERPRETING:
        out = x / y
    else:
        out = tl.div_rn(x, y)
    return out


@triton.jit
def quantize_fp8_rows(a):
    """Per-row (one token, one K-group) FP8 quantization of an fp32 tile [M, G]:
    scale = amax / 448, q = round_e4m3(a * (448 / amax)), both divisions exact. Returns (q fp8, scale fp32 [M])."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-12)
    q = to_dtype(tl.minimum(tl.maximum(a * div_exact(448.0, amax)[:, None], -448.0), 448.0), tl.float8e4nv)
    return q, div_exact(amax, 448.0)
