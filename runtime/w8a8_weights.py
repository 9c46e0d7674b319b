"""What loading W8A8_DYNAMIC modules adds to the float path: who may load them, how many bytes they hold, and the
values the format promises, checked as each scale is read.

The loader (runtime/loader.py) reads a module the checkpoint's description (w8a8_format) marks W8A8_DYNAMIC like
any other tensor, in place and on its worker threads: the int8 weight as stored, its [out, 1] fp32 scale into an
[out] fp32 tensor (one layer's experts into int8 stacks from the backend's empty_experts, in its layout, and scale
stacks beside them), then hands W8A8LinearWeight / W8A8ExpertWeights to the backend. Which tensors must exist, of
what shape and dtype, is checked before anything is read (w8a8_format.expected_tensors, the loader's strict check).
On several ranks a rank reads the rows of the scale and offset that its slice's output channels are: its own rows
for a row slice (q/k/v, w1/w3), every row for a column slice (o_proj, w2).
"""

from __future__ import annotations

import math

import torch

from moerun.backends.base import Backend
from moerun.backends.errors import CheckpointError, UnsupportedModelError
from moerun.runtime.checkpoint import Checkpoint

SCALE_DTYPE = torch.float32


def check_loadable(backend: Backend) -> None:
    """A W8A8 checkpoint runs as int8 or not at all: dequantized to 16 bits it would need twice the memory it was
    made to fit in, so a backend that does not execute W8A8 is refused. Any layout the float model takes
    (ShardPlan.check) loads: a rank's slices are rows or columns of whole output channels, each with its scale."""
    if not backend.capabilities.w8a8:
        raise UnsupportedModelError(
            f"backend {backend.name}: does not run W8A8 checkpoints (msModelSlim W8A8_DYNAMIC: int8 weights, "
            f"per-token int8 activations); use backend ascend (or cpu, the reference), or the float or FP8 checkpoint")


def held_bytes(shape: tuple[int, ...]) -> int:
    """A W8A8 [out, in] weight once loaded: int8 weights and one fp32 scale per output channel."""
    return math.prod(shape) + shape[0] * SCALE_DTYPE.itemsize


def check_scale(ckpt: Checkpoint, module: str, scale: torch.Tensor, first_row: int) -> int:
    """After rows first_row.. of module's weight_scale were read into `scale`: each scale positive and finite, and
    the same rows of weight_offset (read here, [out, 1] fp32) all zeros: W8A8_DYNAMIC weights are symmetric, the
    int8 kernels take no weight zero point. Returns the bytes read here (the offset rows')."""
    name = f"{module}.weight_scale"
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(f"{name}: holds zero, negative or non-finite scales in {ckpt.file_of[name].name}")
    offset_name = f"{module}.weight_offset"
    offset = torch.empty(scale.shape[0], 1, dtype=SCALE_DTYPE)
    ckpt.read_into(offset_name, offset, first_row)
    if bool(offset.ne(0).any()):
        raise CheckpointError(f"{offset_name}: nonzero in {ckpt.file_of[offset_name].name}; asymmetric int8 weights "
                              f"are not supported (W8A8_DYNAMIC is symmetric, offsets 0)")
    return offset.nbytes
