"""Turn a float checkpoint into an FP8 block checkpoint as the M2 release is laid out (float8_e4m3fn weights,
fp32 weight_scale_inv per block, multiplied in), and write the independently dequantized float reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$")
FP8_MAX = 448.0


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    bn, bk = block
    rows, cols = w.shape
    scale = torch.empty(-(-rows // bn), -(-cols // bk))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s = tile.abs().max().clamp_min(1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_numpy(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference dequantization, tile by tile in numpy (written apart from moerun's vectorized one)."""
    bn, bk = block
    qf = q.float().numpy()
    out = np.empty_like(qf)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qf[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] * scale[i, j].item()
    return torch.from_numpy(out)


def make_fp8_pair(float_folder: Path, fp8_folder: Path, ref_folder: Path, block: tuple[int, int]) -> None:
    """fp8_folder: the FP8 checkpoint. ref_folder: the same model with every FP8 weight dequantized to fp32."""
    tensors = load_file(str(float_folder / "model.safetensors"))
    fp8, ref = {}, {}
    for name, t in tensors.items():
        if QUANTIZED.search(name):
            q, s = quantize_block(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = dequantize_numpy(q, s, block)
        else:
            fp8[name] = ref[name] = t
    config = json.loads((float_folder / "config.json").read_text())
    for folder, data, cfg in ((fp8_folder, fp8, {**config, "quantization_config": {
            "quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
            "weight_block_size": list(block), "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}}),
            (ref_folder, ref, config)):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(data, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def shard_checkpoint(folder: Path, num_shards: int) -> None:
    """Split folder/model.safetensors into num_shards files named and indexed as the release is
    (model-00001-of-0000N.safetensors + model.safetensors.index.json), tensors dealt round-robin by name."""
    single = folder / "model.safetensors"
    tensors = load_file(str(single))
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in sorted(tensors)[i::num_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    single.unlink()
