"""W8A8_DYNAMIC tensors of a checkpoint -> a backend's weights: read one linear or one layer's experts (an expert at
a time, into host stacks), check the values the format promises, then hand them to the backend as they are when it
executes W8A8 (capabilities.w8a8), else dequantized to the model dtype (W = int8 x scale per output channel).

The loader calls `linear` and `experts` for every module the checkpoint's description marks W8A8_DYNAMIC
(w8a8_format); which tensors must exist, of what shape and dtype, is w8a8_format.expected_tensors' job.
"""

from __future__ import annotations

import torch

from moerun.backends.base import Backend, ExpertWeights, LinearWeight, W8A8ExpertWeights, W8A8LinearWeight
from moerun.backends.cpu.w8a8 import dequantize
from moerun.backends.errors import CheckpointError
from moerun.runtime.checkpoint import Checkpoint

EXPERT_PARTS = ("w1", "w3", "w2")  # gate, up, down: w1 rows then w3 rows make w13


def read_linear(ckpt: Checkpoint, module: str) -> W8A8LinearWeight:
    """int8 [out, in] weight and its fp32 [out] scale, after checking scale and offset values."""
    weight = ckpt.read(f"{module}.weight")
    return W8A8LinearWeight(weight=weight, scale=_checked_scale(ckpt, module))


def read_experts(ckpt: Checkpoint, moe_prefix: str, expert_ids: list[int], inter: int,
                 hidden: int) -> W8A8ExpertWeights:
    """The listed experts of one layer (moe_prefix = "model.layers.N.block_sparse_moe"), stacked on the host."""
    n = len(expert_ids)
    w13, w2 = torch.empty(n, 2 * inter, hidden, dtype=torch.int8), torch.empty(n, hidden, inter, dtype=torch.int8)
    s13, s2 = torch.empty(n, 2 * inter), torch.empty(n, hidden)
    rows = {"w1": (w13, s13, 0), "w3": (w13, s13, inter), "w2": (w2, s2, 0)}
    for slot, e in enumerate(expert_ids):
        for part in EXPERT_PARTS:
            weight_dest, scale_dest, row0 = rows[part]
            module = f"{moe_prefix}.experts.{e}.{part}"
            weight = ckpt.read(f"{module}.weight")
            weight_dest[slot, row0:row0 + weight.shape[0]] = weight
            scale_dest[slot, row0:row0 + weight.shape[0]] = _checked_scale(ckpt, module)
    return W8A8ExpertWeights(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)


def linear(ckpt: Checkpoint, module: str, backend: Backend) -> object:
    w = read_linear(ckpt, module)
    if backend.capabilities.w8a8:
        return backend.prepare_linear(w)
    return backend.prepare_linear(LinearWeight(dequantize(w.weight, w.scale, backend.dtype)))


def experts(ckpt: Checkpoint, moe_prefix: str, expert_ids: list[int], inter: int, hidden: int,
            backend: Backend) -> object:
    w = read_experts(ckpt, moe_prefix, expert_ids, inter, hidden)
    if backend.capabilities.w8a8:
        return backend.prepare_experts(w)
    return backend.prepare_experts(ExpertWeights(w13=dequantize(w.w13, w.w13_scale, backend.dtype),
                                                 w2=dequantize(w.w2, w.w2_scale, backend.dtype)))


def _checked_scale(ckpt: Checkpoint, module: str) -> torch.Tensor:
    """weight_scale as fp32 [out]. W8A8_DYNAMIC weights are symmetric: weight_offset must be all zeros (the int8
    kernels have no weight zero point), and a scale must be positive and finite."""
    scale = ckpt.read(f"{module}.weight_scale").float().reshape(-1)
    offset = ckpt.read(f"{module}.weight_offset")
    where = ckpt.file_of[f"{module}.weight_scale"].name
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(f"{module}.weight_scale: holds zero, negative or non-finite scales in {where}")
    if bool(offset.ne(0).any()):
        raise CheckpointError(f"{module}.weight_offset: nonzero in {ckpt.file_of[f'{module}.weight_offset'].name}; "
                              f"asymmetric int8 weights are not supported (W8A8_DYNAMIC is symmetric, offsets 0)")
    return scale
