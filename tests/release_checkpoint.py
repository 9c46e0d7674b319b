"""A checkpoint that is the MiniMax-M2.7 release in everything but depth and weights: the release's config.json
(with num_hidden_layers cut), its tensor names, dtypes and shapes, its shard naming with an index, FP8 e4m3
weights with 128x128 fp32 weight_scale_inv blocks, an fp32 router and bias, bf16 embeddings and norms. Weights
are random, generated cheaply and streamed tensor by tensor into the shards, so building the one-layer release
shape (~6 GB on disk) needs almost no memory. With w8a8, the same model as msModelSlim's W8A8_DYNAMIC export lays
it out (runtime/w8a8_format.py): int8 weights with [out, 1] fp32 scales and zero offsets, its file names, its
description, no quantization_config.

Names, shapes and dtypes are spelled here from the release's tensor census, apart from moerun's own table, so a
load test checks moerun's table too. transformers loads these folders as well (scripts/bench_load.py).

    python tests/release_checkpoint.py /work/data/loader/m2.7-1layer            # the release shape, 1 layer
    python tests/release_checkpoint.py DIR --layers 2 --set num_local_experts=32  # smaller or deeper
    python tests/release_checkpoint.py DIR --w8a8                                 # the W8A8 export's layout
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# config.json of the release (M2.5's verbatim copy, M2.7's max_position_embeddings), with its FP8 quantization_config.
RELEASE_CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"],
    "attn_type_list": [1] * 62,
    "bos_token_id": 200034,
    "eos_token_id": 200020,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "max_position_embeddings": 204800,
    "model_type": "minimax_m2",
    "mtp_transformer_layers": 1,
    "num_attention_heads": 48,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 62,
    "num_key_value_heads": 8,
    "num_local_experts": 256,
    "num_mtp_modules": 3,
    "qk_norm_type": "per_layer",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    "rms_norm_eps": 1e-06,
    "rope_theta": 5000000,
    "rotary_dim": 64,
    "scoring_func": "sigmoid",
    "shared_intermediate_size": 0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.1",
    "use_cache": True,
    "use_mtp": True,
    "use_qk_norm": True,
    "use_routing_bias": True,
    "vocab_size": 200064,
}
BLOCK = 128
SHARD_BYTES = 2 << 30
# Random e4m3 bytes with the exponent's top bit cleared: |value| <= 1.875, never NaN (0x7F / 0xFF).
E4M3_MASK = 0xBF
_CODES = np.arange(256, dtype=np.uint8) & E4M3_MASK
E4M3_RMS = float(torch.from_numpy(_CODES).view(torch.float8_e4m3fn).float().pow(2).mean().sqrt())


def release_config(num_layers: int = 1, **overrides) -> dict:
    config = {**RELEASE_CONFIG, **overrides, "num_hidden_layers": num_layers}
    config["attn_type_list"] = [1] * num_layers
    if config["vocab_size"] < RELEASE_CONFIG["vocab_size"]:  # a narrowed vocabulary keeps its special ids inside it
        config["bos_token_id"], config["eos_token_id"] = config["vocab_size"] - 2, config["vocab_size"] - 1
    return config


def tensor_list(config: dict, w8a8: bool = False) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor, in the release's order."""
    h, v, e, i = config["hidden_size"], config["vocab_size"], config["num_local_experts"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

    def fp8(name: str, rows: int, cols: int):
        if w8a8:
            yield name + ".weight", "I8", (rows, cols)
            yield name + ".weight_scale", "F32", (rows, 1)
            yield name + ".weight_offset", "F32", (rows, 1)
            return
        yield name + ".weight", "F8_E4M3", (rows, cols)
        yield name + ".weight_scale_inv", "F32", (-(-rows // BLOCK), -(-cols // BLOCK))

    yield "model.embed_tokens.weight", "BF16", (v, h)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", "BF16", (h,)
        yield from fp8(f"{p}.self_attn.q_proj", q, h)
        yield from fp8(f"{p}.self_attn.k_proj", kv, h)
        yield from fp8(f"{p}.self_attn.v_proj", kv, h)
        yield from fp8(f"{p}.self_attn.o_proj", h, q)
        yield f"{p}.self_attn.q_norm.weight", "BF16", (q,)
        yield f"{p}.self_attn.k_norm.weight", "BF16", (kv,)
        yield f"{p}.post_attention_layernorm.weight", "BF16", (h,)
        yield f"{p}.block_sparse_moe.gate.weight", "F32", (e, h)
        yield f"{p}.block_sparse_moe.e_score_correction_bias", "F32", (e,)
        for expert in range(e):
            x = f"{p}.block_sparse_moe.experts.{expert}"
            yield from fp8(f"{x}.w1", i, h)
            yield from fp8(f"{x}.w2", h, i)
            yield from fp8(f"{x}.w3", i, h)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (v, h)


_ITEMSIZE = {"F8_E4M3": 1, "I8": 1, "BF16": 2, "F32": 4}
INT8_RMS = 73.9  # of uniform random int8: sqrt(mean(k^2) over -128..127)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * _ITEMSIZE[dtype]


def _data(name: str, dtype: str, shape: tuple[int, ...], rng: np.random.Generator, gen: torch.Generator) -> Iterator[bytes]:
    """The tensor's bytes, in pieces of at most ~64 MB. Weights dequantize to ~N(0, 1/fan_in) so activations stay
    in range; norms near 1; a random router and a small correction bias."""
    if dtype == "F8_E4M3":
        yield (np.frombuffer(rng.bytes(_nbytes(dtype, shape)), np.uint8) & E4M3_MASK).tobytes()
    elif dtype == "I8":
        yield rng.bytes(_nbytes(dtype, shape))
    elif name.endswith("weight_offset"):
        yield bytes(_nbytes(dtype, shape))
    elif name.endswith("weight_scale"):  # fan-in taken as the release's hidden size: right for all but o/w2
        yield ((1.0 / (INT8_RMS * RELEASE_CONFIG["hidden_size"] ** 0.5)) * rng.uniform(0.5, 1.5, size=shape)
               ).astype(np.float32).tobytes()
    elif name.endswith("weight_scale_inv"):
        fan_in = shape[1] * BLOCK  # the weight's columns, to a block
        scale = (1.0 / (E4M3_RMS * fan_in ** 0.5)) * rng.uniform(0.5, 1.5, size=shape)
        yield scale.astype(np.float32).tobytes()
    elif dtype == "F32":
        std = 0.5 if name.endswith("e_score_correction_bias") else shape[-1] ** -0.5
        yield (torch.randn(shape, generator=gen) * std).numpy().tobytes()
    elif len(shape) == 1:
        yield (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:  # embedding ~ N(0, 1), lm_head ~ N(0, 1/hidden), a band of rows at a time
        std = 1.0 if name == "model.embed_tokens.weight" else shape[1] ** -0.5
        band = max(1, (32 << 20) // shape[1])
        for r0 in range(0, shape[0], band):
            rows = min(band, shape[0] - r0)
            part = torch.randn(rows, shape[1], generator=gen).mul_(std).to(torch.bfloat16)
            yield part.view(torch.int16).numpy().tobytes()


def write_release_checkpoint(folder: str | Path, num_layers: int = 1, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                             w8a8: bool = False, **overrides) -> Path:
    """Write the folder (config.json, model-0000k-of-0000N.safetensors, model.safetensors.index.json; with w8a8,
    msModelSlim's names and its quant_model_description.json). It is built beside the target and renamed into
    place, so an interrupted build never leaves a folder that looks complete."""
    folder = Path(folder)
    config = release_config(num_layers, **overrides)
    if w8a8:
        del config["quantization_config"]
    tensors = list(tensor_list(config, w8a8))
    prefix = "quant_model_weights" if w8a8 else "model"
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t[1], t[2]) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t[1], t[2])
    build = folder.with_name(folder.name + ".building")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"{prefix}-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(build / file, shard, rng, gen)
        weight_map.update({name: file for name, _, _ in shard})
    total = sum(_nbytes(dtype, shape) for _, dtype, shape in tensors)
    (build / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if w8a8:
        from moerun.runtime.w8a8_format import description_json

        described = {name: "W8A8_DYNAMIC" if dtype == "I8" or name.endswith(("weight_scale", "weight_offset"))
                     else "FLOAT" for name, dtype, _ in tensors}
        (build / "quant_model_description.json").write_text(json.dumps(description_json(described, "W8A8_DYNAMIC")))
    (build / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(build, folder)
    return folder


def _write_shard(path: Path, shard: list[tuple[str, str, tuple[int, ...]]], rng, gen) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in shard:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + _nbytes(dtype, shape)]}
        offset += _nbytes(dtype, shape)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape in shard:
            for piece in _data(name, dtype, shape, rng, gen):
                f.write(piece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                        help="override an integer config.json field, e.g. num_local_experts=32")
    parser.add_argument("--w8a8", action="store_true", help="msModelSlim's W8A8_DYNAMIC layout instead of FP8")
    args = parser.parse_args()
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    print(write_release_checkpoint(args.folder, args.layers, w8a8=args.w8a8, **overrides))


if __name__ == "__main__":
    main()
