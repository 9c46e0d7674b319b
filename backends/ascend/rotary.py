"""Partial NeoX rotary on Ascend with npu_rotary_mul.

MiniMax-M2 rotates only the first rotary_dim (64) of 128 head dims. npu_apply_rotary_pos_emb takes whole heads of
64 or 128 dims, so it cannot express "rotate 64 of 128"; npu_rotary_mul takes any even D < 896. The rotated slice
goes through it in the BSND layout ([1, T, heads, rotary_dim] with cos/sin [1, T, 1, rotary_dim], a documented
broadcast), and the untouched dims are appended back.
"""

from __future__ import annotations

from types import ModuleType

import torch


def apply(ops: ModuleType, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, rot = cos.shape
    r1 = cos.to(q.dtype).reshape(1, num_tokens, 1, rot)
    r2 = sin.to(q.dtype).reshape(1, num_tokens, 1, rot)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rotated = ops.npu_rotary_mul(x[..., :rot].unsqueeze(0).contiguous(), r1, r2, rotary_mode="half")[0]
        return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)

    return rotate(q), rotate(k)
