"""MiniMax-M2 config.json -> ModelConfig: every field the graph uses, checked, with the legacy fields resolved."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moerun.backends.errors import CheckpointError, shown
from moerun.runtime.files import MiB, is_dir, read_json_object

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


# Upper bounds of sizes, far beyond any real model (M2: hidden 3072, 48 heads, vocab 200064, 196608 positions),
# so a garbled config.json is refused here rather than by an allocation later.
MAX_LAYERS = 1 << 12
_MAX = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "num_hidden_layers": MAX_LAYERS, "num_attention_heads": 1 << 10,
        "head_dim": 1 << 10, "intermediate_size": 1 << 20, "num_local_experts": 1 << 16,
        "max_position_embeddings": 1 << 24}
MAX_CONFIG_JSON_BYTES = 4 * MiB

# What the MiniMax-M2 release's quantization_config says, used where a field is left out.
RELEASE_FP8_BLOCK = (128, 128)
RELEASE_NOT_CONVERTED = ("gate", "e_score_correction_bias", "lm_head")


def load_model_config(folder: Path) -> ModelConfig:
    if not is_dir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder not found (model.path must be an HF checkpoint folder)")
    path = folder / "config.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no config.json (a Hugging Face checkpoint folder holds config.json and *.safetensors)")
    return parse_model_config(read_json_object(path, MAX_CONFIG_JSON_BYTES, "config.json"), str(path))


def parse_model_config(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Every field moerun reads, checked for type, range and the relations between them."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    f = _Fields(raw, where)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {shown(model_type)} is not supported (moerun runs: {', '.join(MODEL_TYPES)})")

    vocab = f.int("vocab_size")
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads")
    if kv_heads > heads or heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if raw.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: head_dim is missing and hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads}")
    head_dim = f.int("head_dim", default=hidden // heads)
    experts = f.int("num_local_experts")
    top_k = f.int("num_experts_per_tok")
    if top_k > experts:
        raise CheckpointError(f"{where}: num_experts_per_tok {top_k} is more than num_local_experts {experts} "
                              f"(allowed: 1..{experts})")

    # RoPE settings live at the top level (legacy) and in rope_parameters / rope_scaling (newer transformers);
    # every place that holds one is checked, and where several do they must agree.
    rope_sections = [f] + [_Fields(f.mapping(key), f"{where}: {key}") for key in ("rope_parameters", "rope_scaling")]
    for section in rope_sections[1:]:
        rope_type = section.str("rope_type", default=None) or section.str("type", default="default")
        if rope_type != "default":
            raise CheckpointError(f"{where}: rope_type {shown(rope_type)} is not supported (MiniMax-M2 uses plain RoPE: 'default')")
    rope_theta = _agreed(rope_sections, "rope_theta", 10000.0,
                         lambda s: s.float("rope_theta", default=None, lo=0.0, lo_open=True, hi=1e30))
    factor = _agreed(rope_sections, "partial_rotary_factor", None,
                     lambda s: s.float("partial_rotary_factor", default=None, lo=0.0, hi=1.0, lo_open=True))
    rotary_dim = _rotary_dim(f, head_dim, factor)

    if not f.bool("use_qk_norm", default=True) or f.str("qk_norm_type", default="per_layer") != "per_layer":
        raise CheckpointError(f"{where}: only qk_norm_type 'per_layer' with use_qk_norm true is supported (MiniMax-M2)")
    scoring = f.str("scoring_func", default="sigmoid")
    if scoring != "sigmoid":
        raise CheckpointError(f"{where}: scoring_func {shown(scoring)} is not supported (MiniMax-M2 uses 'sigmoid')")
    if f.int("shared_intermediate_size", default=0, lo=0):
        raise CheckpointError(f"{where}: shared experts (shared_intermediate_size > 0) are not part of MiniMax-M2")
    attn_types = raw.get("attn_type_list")
    if attn_types is not None and not (isinstance(attn_types, list) and all(t in (0, 1) and not isinstance(t, bool)
                                                                          for t in attn_types)):
        raise CheckpointError(f"{where}: attn_type_list must be a list of 0 and 1, got {shown(attn_types)}")
    if attn_types and any(t != 1 for t in attn_types):
        raise CheckpointError(f"{where}: attn_type_list has linear-attention layers (0); MiniMax-M2 is full attention (1)")

    quant = f.mapping("quantization_config") if raw.get("quantization_config") is not None else None
    fp8_block, not_converted = _quantization(quant, f"{where}: quantization_config")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=rope_theta,
        intermediate_size=f.int("intermediate_size"),
        num_experts=experts,
        top_k=top_k,
        # eps is added to a mean of squares before the square root: <= 0 gives inf/NaN, >= 1 washes out the norm.
        rms_norm_eps=f.float("rms_norm_eps", default=1e-6, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        max_position_embeddings=f.int("max_position_embeddings", default=196608),
        tie_word_embeddings=f.bool("tie_word_embeddings", default=False),
        bos_token_id=f.token_id("bos_token_id", vocab),
        eos_token_ids=f.token_ids("eos_token_id", vocab),
        checkpoint_dtype=f.str("torch_dtype", default=None) or f.str("dtype", default="bfloat16"),
        fp8_block=fp8_block,
        fp8_modules_not_converted=not_converted,
    )


_MISSING = object()


class _Fields:
    """Typed reads of one JSON object; every error names the file, the field and what is allowed."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw, self.where = raw, where

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.where}: missing {key!r}")
            return default
        return value

    def _bad(self, key: str, value: Any, allowed: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {key!r} must be {allowed}, got {shown(value)}")

    def int(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int | None = None) -> int:
        value = self._get(key, default)
        hi = _MAX.get(key, 1 << 30) if hi is None else hi
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self._bad(key, value, f"an integer in {lo}..{hi}")
        return value

    def float(self, key: str, default: Any, lo: float, hi: float, lo_open: bool = False,
              hi_open: bool = False) -> float:
        value = self._get(key, default)
        allowed = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._bad(key, value, allowed)
        number = float(value) if abs(value) < 1e308 else math.inf
        if not (math.isfinite(number) and (lo < number if lo_open else lo <= number)
                and (number < hi if hi_open else number <= hi)):
            raise self._bad(key, value, allowed)
        return number

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def str(self, key: str, default: Any) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, value, "an object {...} or null")
        return value

    def token_id(self, key: str, vocab: int) -> int | None:
        value = self.raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab):
            raise self._bad(key, value, f"a token id in 0..{vocab - 1} or null")
        return value

    def token_ids(self, key: str, vocab: int) -> tuple[int, ...]:
        value = self.raw.get(key)
        items = value if isinstance(value, list) else [] if value is None else [value]
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in items):
            raise self._bad(key, value, f"a token id in 0..{vocab - 1}, a list of them, or null")
        return tuple(items)


def _quantization(quant: dict[str, Any] | None, where: str) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
    """(weight block, modules kept unquantized) of an FP8 checkpoint, (None, ()) of a float one. Fields the
    release always writes but some exports leave out take the release's values rather than failing later as a
    wall of unexpected tensors."""
    if quant is None:
        return None, ()
    f = _Fields(quant, where)
    method = f.str("quant_method", default=_MISSING)
    if method != "fp8":
        raise CheckpointError(f"{where}: quant_method {shown(method)} is not supported (allowed: fp8)")
    fmt = f.str("fmt", default="float8_e4m3fn")
    if fmt not in ("float8_e4m3fn", "e4m3"):
        raise CheckpointError(f"{where}: fmt {shown(fmt)} is not supported (allowed: float8_e4m3fn)")
    scheme = f.str("activation_scheme", default="dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"{where}: activation_scheme {shown(scheme)} is not supported (allowed: dynamic)")
    block = quant.get("weight_block_size", list(RELEASE_FP8_BLOCK))
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 16 for b in block)):
        raise CheckpointError(f"{where}: weight_block_size must be two integers in 1..65536 like [128, 128], "
                              f"got {shown(block)}")
    not_converted = quant.get("modules_to_not_convert", list(RELEASE_NOT_CONVERTED))
    if not_converted is None:
        not_converted = []
    if not (isinstance(not_converted, list) and all(isinstance(m, str) and m for m in not_converted)):
        raise CheckpointError(f"{where}: modules_to_not_convert must be a list of module names like "
                              f"{list(RELEASE_NOT_CONVERTED)}, got {shown(not_converted)}")
    return (block[0], block[1]), tuple(not_converted)


def _agreed(sections: list[_Fields], key: str, default: Any, read: Callable[[_Fields], Any]) -> Any:
    """The one value of `key` across the sections that hold it (each checked by `read`), else `default`."""
    values = [(section.where, read(section)) for section in sections if section.raw.get(key) is not None]
    for where, value in values[1:]:
        if not math.isclose(value, values[0][1], rel_tol=1e-9):
            raise CheckpointError(f"{where}: {key} {value:g} disagrees with {values[0][1]:g} in {values[0][0]}")
    return values[0][1] if values else default


def _rotary_dim(f: _Fields, head_dim: int, factor: float | None) -> int:
    """Partial RoPE: MiniMax-M2 rotates the first 64 of 128 dims. The released config.json only has the legacy
    `rotary_dim`; newer transformers write rope_parameters.partial_rotary_factor. Dropping the legacy field turns
    partial into full RoPE (transformers#48241), so both are read and must agree."""
    legacy = f.int("rotary_dim", default=None) if f.raw.get("rotary_dim") is not None else None
    from_factor = int(head_dim * factor) if factor is not None else None
    if legacy is not None and from_factor is not None and legacy != from_factor:
        raise CheckpointError(f"{f.where}: rotary_dim {legacy} disagrees with partial_rotary_factor {factor} x head_dim {head_dim}")
    dim = legacy if legacy is not None else (from_factor if from_factor is not None else head_dim)
    if not (0 < dim <= head_dim and dim % 2 == 0):
        raise CheckpointError(f"{f.where}: rotary_dim {dim} must be even and within head_dim {head_dim}")
    return dim
