"""CPU emulation of torch_npu's fused element-wise ops: npu_rms_norm, npu_add_rms_norm, npu_swiglu, npu_rotary_mul.

Semantics and limits from the op-plugin docs and the torch_npu API reference. Internal precision is not
documented; the emulation computes in fp32 and rounds once to the output dtype, as a fused kernel does, except
npu_swiglu, whose 16-bit rounding (silu(A) rounded, then times B) follows Huawei's own accuracy-checker golden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerun.backends.ascend.emulated_checks import not_emulated, require, require_contiguous, require_dtype

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_norm(x: torch.Tensor, gamma: torch.Tensor, op: str, name: str) -> tuple[int, ...]:
    """The dims gamma normalizes over (its trailing dims of x), after the documented argument checks."""
    require(1 <= x.dim() <= 8, op, f"{name} must have 1 to 8 dims, got {x.dim()}")
    require_dtype(x, FLOATS, op, name)
    require(gamma.dtype == x.dtype, op, f"gamma dtype {gamma.dtype} must equal {name}'s {x.dtype}")
    require(0 < gamma.dim() <= x.dim() and tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape), op,
            f"gamma shape {tuple(gamma.shape)} must match {name}'s trailing dims {tuple(x.shape)}")
    return tuple(range(x.dim() - gamma.dim(), x.dim()))


def _normalize(xf: torch.Tensor, gamma: torch.Tensor, dims: tuple[int, ...], epsilon: float):
    """fp32 in: (xf * rstd * gamma in fp32, rstd with the normalized dims kept as 1)."""
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return xf * rstd * gamma.float(), rstd


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """-> (y in x's dtype, rstd fp32)."""
    dims = _check_norm(self, gamma, "npu_rms_norm", "x")
    y, rstd = _normalize(self.float(), gamma, dims, epsilon)
    return y.to(self.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """-> (RMSNorm(x1 + x2) * gamma, rstd fp32, x1 + x2): three outputs, the sum being the next residual."""
    op = "npu_add_rms_norm"
    dims = _check_norm(x1, gamma, op, "x1")
    require(x2.dtype == x1.dtype, op, f"x2 dtype {x2.dtype} must equal x1's {x1.dtype}")
    require(x2.shape == x1.shape, op, f"x2 shape {tuple(x2.shape)} must equal x1's {tuple(x1.shape)}")
    summed = x1.float() + x2.float()  # the fused kernel normalizes the fp32 sum; only xOut is rounded
    y, rstd = _normalize(summed, gamma, dims, epsilon)
    return y.to(x1.dtype), rstd, summed.to(x1.dtype)


def npu_swiglu(self, dim=-1):
    """Split along dim into halves A (first) and B (second): swish(A) * B = A * sigmoid(A) * B. Gate first."""
    op = "npu_swiglu"
    require(1 <= self.dim() <= 8, op, f"input must have 1 to 8 dims, got {self.dim()}")
    require(-self.dim() <= dim < self.dim(), op, f"dim {dim} is out of range for {self.dim()} dims")
    require(self.numel() > 0, op, "empty tensors are not supported")
    require_dtype(self, FLOATS, op, "input")
    require_contiguous(self, op, "input")
    require(self.shape[dim] % 2 == 0, op, f"size {self.shape[dim]} along dim {dim} must be even")
    a, b = self.float().chunk(2, dim=dim)
    if self.dtype == torch.float32:
        return F.silu(a) * b
    return (F.silu(a).to(self.dtype).float() * b).to(self.dtype)


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):  # noqa: A002 (torch_npu's parameter name)
    """input * r1 + rotate(input) * r2; 'half' rotate = cat(-x2, x1) (NeoX), 'interleave' = pairs (2i, 2i+1)."""
    op = "npu_rotary_mul"
    if rotate is not None:
        not_emulated(op, "rotate")
    require(rotary_mode in ("half", "interleave"), op,
            f"rotary_mode {rotary_mode!r} is not supported on A2/A3 (half, interleave)")
    require(input.dim() in (3, 4), op, f"input must be 3-D (TND) or 4-D (BNSD/BSND/SBND), got {input.dim()}-D")
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        require_dtype(t, FLOATS, op, name)
    require(r1.dtype == input.dtype and r2.dtype == input.dtype, op, "r1 and r2 must have input's dtype")
    require(r1.shape == r2.shape, op, f"r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} shapes differ")
    dim = input.shape[-1]
    require(dim % 2 == 0 and dim < 896, op, f"D must be even and < 896, got {dim}")
    require(tuple(r1.shape) in _allowed_coefficient_shapes(tuple(input.shape)), op,
            f"r1/r2 shape {tuple(r1.shape)} does not broadcast in a supported pattern against {tuple(input.shape)}")
    if input.dim() == 4:  # B and N < 1000 in every 4-D layout, whichever two axes they are
        require(sorted(input.shape[:3])[1] < 1000, op, "B and N must be < 1000")
    require(bool((r1.abs() <= 1).all() and (r2.abs() <= 1).all()), op, "r1/r2 (cos/sin) values must lie in [-1, 1]")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return (x * r1.float() + rotated * r2.float()).to(input.dtype)


def _allowed_coefficient_shapes(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """cos/sin broadcast patterns the A2/A3 kernel documents (jit_compile=False, half mode)."""
    if len(shape) == 3:  # TND: T1D or TND
        t, _, d = shape
        return {(t, 1, d), shape}
    a, b, c, d = shape  # BNSD: 11SD/B1SD; BSND: 1S1D/BS1D; SBND: S11D/SB1D; all: the full shape
    return {(1, 1, c, d), (a, 1, c, d), (1, b, 1, d), (a, b, 1, d), (a, 1, 1, d), shape}
