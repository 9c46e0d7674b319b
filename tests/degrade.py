"""Deliberately degraded copies of a float checkpoint, for fidelity tests and measurements (never product code):
weights fake-quantized to b bits, one layer's weights perturbed by noise, or a chat template that renders some
prompts differently (tool-schema keys sorted, the system prompt dropped, a second BOS).

Fake quantization as weight-only quantizers (GPTQ/AWQ-style round-to-nearest) do it: symmetric, one scale per
group of `group` consecutive input columns (absmax / (2^(b-1) - 1)), rounded to the integer grid and back, then
stored in the checkpoint's dtype, so the copy loads like the original. The linears of attention and of the experts
are quantized; embeddings, norms, the router and lm_head stay as they are (as quantized releases leave them).

    python tests/degrade.py SRC DST --bits 4 [--group 128]
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$")


def fake_quantize(w: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
    """Round-to-nearest symmetric b-bit quantization with one scale per `group` input columns (the whole row when
    it is shorter), dequantized back to w's dtype."""
    rows, cols = w.shape
    g = min(group, cols)
    if cols % g:
        raise ValueError(f"{cols} input columns are not a multiple of the group size {g}")
    levels = 2 ** (bits - 1) - 1
    tiles = w.float().reshape(rows, cols // g, g)
    scale = tiles.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    return ((tiles / scale).round().clamp(-levels, levels) * scale).reshape(rows, cols).to(w.dtype)


def write_changed_copy(src: Path, dst: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Copy the checkpoint folder, rewriting each safetensors file with change(name, tensor) applied; one shard in
    memory at a time."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
            tensors = {name: change(name, f.get_tensor(name)) for name in f.keys()}
        save_file(tensors, str(dst / shard.name), metadata=metadata)


def write_fake_quantized(src: Path, dst: Path, bits: int, group: int = 128) -> None:
    write_changed_copy(src, dst, lambda name, t: fake_quantize(t, bits, group) if QUANTIZED.search(name) else t)


def write_layer_noise(src: Path, dst: Path, layer: int, relative: float, seed: int = 0) -> None:
    """Every weight matrix of one decoder layer gets Gaussian noise of `relative` x its RMS."""
    gen = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{layer}."

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if not (name.startswith(prefix) and t.dim() == 2):
            return t
        tf = t.float()
        return (tf + relative * tf.pow(2).mean().sqrt() * torch.randn(tf.shape, generator=gen)).to(t.dtype)

    write_changed_copy(src, dst, change)


# name -> (text of the demo's M2 template, what the degraded copy has instead)
TEMPLATE_CHANGES = {
    "sorted-tool-keys": ("| tojson ~ '</tool>", "| tojson(sort_keys=True) ~ '</tool>"),
    "no-system-prompt": ("(system_text or 'You are a helpful assistant.')", "'You are a helpful assistant.'"),
    "second-bos": ("{{- ']~!b[' ~ ']~b]system", "{{- ']~!b[' ~ ']~!b[' ~ ']~b]system"),
}


def write_template_variant(src: Path, dst: Path, change: str) -> None:
    """A copy of the checkpoint folder whose chat_template.jinja has one of TEMPLATE_CHANGES."""
    src, dst = Path(src), Path(dst)
    old, new = TEMPLATE_CHANGES[change]
    template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if template.count(old) != 1:
        raise ValueError(f"{src}: the chat template has not exactly one {old!r} to change")
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template.replace(old, new), encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    write_fake_quantized(args.src, args.dst, args.bits, args.group)
