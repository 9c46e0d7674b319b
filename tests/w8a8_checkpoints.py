"""W8A8 checkpoints for tests: transformers-saved checkpoints through `moerun quantize --w8a8`, an independent
numpy quantization to check them against, the stored tensors read with safetensors, and transformers' model of a
W8A8 folder as one rank layout computes it (int8 weights dequantized, activations quantized by hand)."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open


def numpy_quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-output-channel symmetric int8 in numpy: scale = max|w| / 127 per row in float32 (1 for an
    all-zero row), q = w / scale in float32 (IEEE division, as torch's), rounded half to even: (q int8, scale [out])."""
    w = weight.astype(np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    return np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8), scale


def quantize(src: Path, dst: Path, max_shard_size: str = "4GB") -> Path:
    from moerun.runtime.cli import main

    assert main(["quantize", "--w8a8", str(src), str(dst), "--max-shard-size", max_shard_size]) == 0
    return dst


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a W8A8 folder, read with safetensors."""
    out = {}
    for shard in sorted(Path(folder).glob("quant_model_weights-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def fake_quantize(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., n] as an int8 matmul on one rank sees it: each token's consecutive `width` columns (one rank's slice
    of the input) quantized on their own, scale = max|slice| / 127 (1 for an all-zero slice), rounded half to
    even, and multiplied back: the documented npu_dynamic_quant per slice, in float."""
    *lead, n = x.shape
    xs = x.float().reshape(*lead, n // width, width)
    scale = xs.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(xs / scale).clamp(-128, 127) * scale).reshape(x.shape).to(x.dtype)


def w8a8_transformers_model(float_model, folder: Path, o_proj_width: int, intermediate_width: int):
    """A copy of transformers' float MiniMaxM2ForCausalLM computing what a W8A8 run does on a layout whose ranks
    hold o_proj_width columns of o_proj and intermediate_width of each expert's intermediate: every quantized
    linear's weight is the folder's int8 x its channel scale, and its input is fake_quantize'd per token — q/k/v
    and the experts' gate/up over the whole hidden (replicated on every rank), o_proj and the experts' down
    projection per rank slice. The experts run token by token (transformers' own attention, norms, rotary and
    routing around them)."""
    model = copy.deepcopy(float_model).float()
    files = stored(folder)

    def dequantized(module: str) -> torch.Tensor:
        return files[f"{module}.weight"].float() * files[f"{module}.weight_scale"].float()

    def quantized_input(width: int):
        return lambda module, args: (fake_quantize(args[0], width),)

    hidden = model.config.hidden_size
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, p = layer.self_attn, f"model.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(attn, name)
                proj.weight.copy_(dequantized(f"{p}.self_attn.{name}"))
                proj.register_forward_pre_hook(quantized_input(o_proj_width if name == "o_proj" else hidden))
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                m = f"{p}.block_sparse_moe.experts.{e}"
                experts.gate_up_proj[e] = torch.cat([dequantized(f"{m}.w1"), dequantized(f"{m}.w3")])
                experts.down_proj[e] = dequantized(f"{m}.w2")
            experts.forward = types.MethodType(_token_by_token_experts(intermediate_width), experts)
    return model


def _token_by_token_experts(intermediate_width: int):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        x = fake_quantize(hidden_states, hidden_states.shape[-1])
        out = torch.zeros_like(hidden_states)
        for t in range(x.shape[0]):
            for j, e in enumerate(top_k_index[t].tolist()):
                gate, up = (self.gate_up_proj[e] @ x[t]).chunk(2)
                h = fake_quantize(F.silu(gate) * up, intermediate_width)
                out[t] += top_k_weights[t, j] * (self.down_proj[e] @ h)
        return out

    return forward
