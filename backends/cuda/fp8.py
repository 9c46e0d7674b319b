"""FP8 weights kept as the checkpoint stores them (float8_e4m3fn + fp32 scale per [bn, bk] block, multiplied in)
and the dense linear over them. The math is in gemm.py; this file holds the container and the checks."""

from __future__ import annotations

import dataclasses

import torch

from moerun.backends.base import LinearWeight
from moerun.backends.cuda import gemm
from moerun.backends.cuda.device import max_shared_memory
from moerun.backends.cuda.triton_utils import INTERPRETING, next_pow2
from moerun.backends.errors import UnsupportedModelError


@dataclasses.dataclass
class Fp8Linear:
    weight: torch.Tensor  # [out, in] float8_e4m3fn
    scale_inv: torch.Tensor  # [ceil(out/bn), ceil(in/bk)] fp32
    block: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes


def check_block(block: tuple[int, int]) -> None:
    """The activation group is the weight's K-block, and a Triton tile's K extent must be a power of two."""
    bn, bk = block
    if bk != next_pow2(bk) or not 16 <= bk <= 256 or bn <= 0:
        raise UnsupportedModelError(f"backend cuda: FP8 weight block {list(block)} is not supported "
                                    f"(block_k must be a power of two in 16..256; M2 uses [128, 128])")


def prepare(w: LinearWeight, device: torch.device) -> Fp8Linear:
    check_block(w.block)
    return Fp8Linear(w.weight.to(device).contiguous(), w.scale_inv.to(device, torch.float32).contiguous(), tuple(w.block))


def linear(x: torch.Tensor, w: Fp8Linear) -> torch.Tensor:
    rows = x.shape[0]
    out = torch.empty(rows, w.weight.shape[0], dtype=x.dtype, device=x.device)
    if rows:
        cfg = gemm.pick_config(rows, w.block[1], INTERPRETING, x.element_size(), max_shared_memory(x.device))
        gemm.dense_fp8(x if x.stride(-1) == 1 else x.contiguous(), w.weight, w.scale_inv, w.block, out, cfg)
    return out
