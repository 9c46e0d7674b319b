"""The model's weights as the graph sees them. Linear and expert entries hold whatever the backend's
prepare_linear / prepare_experts returned (a tensor, an FP8 pair, a re-laid-out stack): the graph only passes
them back to the backend."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    q_norm: torch.Tensor  # [Hq * D]: one norm over all query heads jointly ("per_layer" QK-norm)
    k_norm: torch.Tensor  # [Hkv * D]
    post_attention_norm: torch.Tensor  # [H]
    router: torch.Tensor  # [E, H] fp32, as the checkpoint stores it
    router_bias: torch.Tensor  # [E] fp32 e_score_correction_bias: selection only
    experts: Any


@dataclasses.dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: Any


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ModelWeights or one of its entries (dataclasses and lists of tensors, nested), e.g. to
    count the bytes a loaded model holds."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors(x)]
    return []
