"""MiniMax-M2 config.json -> ModelConfig: every field the graph uses, checked, with the legacy fields resolved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moerun.backends.errors import CheckpointError

MODEL_TYPES = ("minimax_m2",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    intermediate_size: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str  # dtype of the non-quantized tensors, as the checkpoint says
    fp8_block: tuple[int, int] | None  # weight_block_size of an FP8 checkpoint
    fp8_modules_not_converted: tuple[str, ...]


def load_model_config(folder: Path) -> ModelConfig:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found (model.path must be an HF checkpoint folder)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face checkpoint folder holds config.json and *.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_model_config(raw, str(path))


def parse_model_config(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (moerun runs: {', '.join(MODEL_TYPES)})")

    def need(key: str, kind: type = int) -> Any:
        if key not in raw:
            raise CheckpointError(f"{where}: missing {key!r}")
        value = raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
            raise CheckpointError(f"{where}: {key!r} must be a positive {kind.__name__}, got {value!r}")
        return value

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = need("num_key_value_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    rotary_dim = _rotary_dim(raw, head_dim, where)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{where}: rope_type {rope_type!r} is not supported (MiniMax-M2 uses plain RoPE: 'default')")
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))

    if raw.get("use_qk_norm", True) is False or raw.get("qk_norm_type", "per_layer") != "per_layer":
        raise CheckpointError(f"{where}: only qk_norm_type 'per_layer' with use_qk_norm true is supported (MiniMax-M2)")
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise CheckpointError(f"{where}: scoring_func {raw['scoring_func']!r} is not supported (MiniMax-M2 uses 'sigmoid')")
    if raw.get("shared_intermediate_size", 0):
        raise CheckpointError(f"{where}: shared experts (shared_intermediate_size > 0) are not part of MiniMax-M2")
    attn_types = raw.get("attn_type_list")
    if attn_types and any(t != 1 for t in attn_types):
        raise CheckpointError(f"{where}: attn_type_list has linear-attention layers (0); MiniMax-M2 is full attention (1)")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())

    fp8_block, not_converted = None, ()
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method")
        if method != "fp8":
            raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not supported (allowed: fp8)")
        fmt = quant.get("fmt", "float8_e4m3fn")
        if fmt not in ("float8_e4m3fn", "e4m3"):
            raise CheckpointError(f"{where}: quantization_config.fmt {fmt!r} is not supported (allowed: float8_e4m3fn)")
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}")
        fp8_block = (block[0], block[1])
        not_converted = tuple(quant.get("modules_to_not_convert") or ())

    return ModelConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=rope_theta,
        intermediate_size=need("intermediate_size"),
        num_experts=need("num_local_experts"),
        top_k=need("num_experts_per_tok"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 196608)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        checkpoint_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        fp8_block=fp8_block,
        fp8_modules_not_converted=not_converted,
    )


def _rotary_dim(raw: dict[str, Any], head_dim: int, where: str) -> int:
    """Partial RoPE: MiniMax-M2 rotates the first 64 of 128 dims. The released config.json only has the legacy
    `rotary_dim`; newer transformers write rope_parameters.partial_rotary_factor. Dropping the legacy field turns
    partial into full RoPE (transformers#48241), so both are read and must agree."""
    rope = raw.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    legacy = raw.get("rotary_dim")
    from_factor = int(head_dim * factor) if factor is not None else None
    if legacy is not None and from_factor is not None and legacy != from_factor:
        raise CheckpointError(f"{where}: rotary_dim {legacy} disagrees with partial_rotary_factor {factor} x head_dim {head_dim}")
    dim = legacy if legacy is not None else (from_factor if from_factor is not None else head_dim)
    if not (0 < dim <= head_dim and dim % 2 == 0):
        raise CheckpointError(f"{where}: rotary_dim {dim} must be even and within head_dim {head_dim}")
    return dim
