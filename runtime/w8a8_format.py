"""The msModelSlim W8A8 checkpoint format (its "ascendV1" saver) for MiniMax-M2: what a folder holds, parsed and
checked strictly, every problem one line naming the tensor.

A W8A8 folder holds config.json (quantization_config removed), the tokenizer and template files,
quant_model_description.json, and quant_model_weights-0000i-of-0000n.safetensors with
quant_model_weights.safetensors.index.json (or one unsharded quant_model_weights.safetensors). The description maps
every stored tensor to its quantization type, plus a few global fields:

  {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0, "metadata": {}, "optional": {...},
   "model.layers.0.self_attn.q_proj.weight": "W8A8_DYNAMIC",          int8 [out, in]
   "model.layers.0.self_attn.q_proj.weight_scale": "W8A8_DYNAMIC",    fp32 [out, 1]
   "model.layers.0.self_attn.q_proj.weight_offset": "W8A8_DYNAMIC",   fp32 [out, 1], zeros (symmetric)
   "model.layers.0.block_sparse_moe.experts.7.w1.weight": "W8A8_DYNAMIC", ... (w1 gate, w3 up, w2 down)
   "model.layers.0.block_sparse_moe.gate.weight": "FLOAT", ...}       router, e_score_correction_bias, norms,
                                                                      embed_tokens and lm_head stay float
W8A8_DYNAMIC = per-output-channel symmetric int8 weights, activations quantized per token at run time: what
msModelSlim's MiniMax-M2.7 recipe produces (its QuaRot rotation is baked into the stored tensors, float ones
included, so nothing here undoes it; an offline rotation is only recorded under "optional").

Refused, each in one line: static "W8A8" (input_scale / input_offset / quant_bias / deq_scale: per-tensor static
activation quantization, a different kernel chain), every other msModelSlim type, per-group scales
(group_size > 0), KV-cache / attention / communication quantization (C8, FAQuant, reduce_quant_type), online
rotations (metadata.quarot), and a quantized type on a tensor that must stay float.
Sources: msModelSlim msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py and utils/safetensors.py
(3de0a3c), docs/en/feature_guide/quick_quantization_v1/quantization_result.md; vllm-ascend
vllm_ascend/quantization/modelslim_config.py (182b75e).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from moerun.backends.errors import CheckpointError
from moerun.runtime.files import MiB, read_json_object

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_PREFIX = "quant_model_weights"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
FORMAT_VERSION = "1.0.0"  # what msModelSlim's ascendV1 saver writes

W8A8_DYNAMIC = "W8A8_DYNAMIC"
FLOAT = "FLOAT"
SUPPORTED_TYPES = (W8A8_DYNAMIC, FLOAT)
# Every per-tensor type msModelSlim documents; all but the two above are refused by name.
MSMODELSLIM_TYPES = ("FLOAT", "W16A16S", "W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A4_DYNAMIC",
                     "WFP8AFP8_DYNAMIC", "W8A8_MXFP8", "W4A8_MXFP", "W4A4_MXFP4", "W4A8_DYNAMIC", "C8", "FAQuant",
                     "FLATQUANT_DYNAMIC", "FLATQUANT")
STATIC_W8A8_REFUSAL = ("static W8A8 (input_scale, input_offset, quant_bias, deq_scale: activations quantized with "
                       "calibrated per-tensor scales) is not supported; moerun runs W8A8_DYNAMIC (per-token dynamic "
                       "activations), which msModelSlim's MiniMax-M2 w8a8 recipe writes")
# Global fields: the ones that only describe (accepted) and the ones that switch on a feature (refused if set).
DESCRIPTIVE_FIELDS = ("model_quant_type", "version", "group_size", "metadata", "optional")
FEATURE_FIELDS = {"kv_quant_type": "KV-cache quantization", "kv_cache_type": "KV-cache quantization",
                  "fa_quant_type": "attention (FA) quantization", "indexer_quant_type": "indexer quantization",
                  "reduce_quant_type": "communication quantization"}
# The MiniMax-M2 linears msModelSlim's recipe quantizes ("*self_attn*", "*block_sparse_moe.experts*"); everything
# else (router gate, e_score_correction_bias, norms, embed_tokens, lm_head) must be FLOAT.
QUANTIZABLE = re.compile(r"\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])$")
EXPERT = re.compile(r"^(.*\.block_sparse_moe)\.experts\.\d+\.w[123]\.weight$")
QUANT_SUFFIXES = ("weight_scale", "weight_offset")

TensorSpec = tuple[tuple[int, ...], str | None]  # (shape, safetensors dtype, or None for any float)
FLOAT_DTYPES = ("F32", "BF16", "F16")


@dataclasses.dataclass(frozen=True)
class Description:
    """What a checked description says: the global fields only describe (an offline rotation under "optional" is
    already in the weights), so the per-tensor types are all a loader needs."""

    model_quant_type: str
    tensors: dict[str, str]  # stored tensor name -> W8A8_DYNAMIC or FLOAT

    def is_quantized(self, module: str) -> bool:
        return self.tensors.get(f"{module}.weight") == W8A8_DYNAMIC


def is_w8a8_folder(folder: Path) -> bool:
    """msModelSlim's files are there: its description (whatever kind of file: read_description checks), or its
    weights files (then the missing description is refused by name, not as a float checkpoint's stray tensors)."""
    folder = Path(folder)
    return os.path.lexists(folder / DESCRIPTION_FILE) or any(folder.glob(f"{WEIGHTS_PREFIX}*.safetensors"))


def read_description(folder: Path) -> Description:
    path = Path(folder) / DESCRIPTION_FILE
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing (a W8A8 checkpoint has msModelSlim's {DESCRIPTION_FILE})")
    # Like the shard index it names every tensor: capped alike, and only a regular file is read.
    return parse_description(read_json_object(path, 64 * MiB, DESCRIPTION_FILE), str(path))


def parse_description(raw: Any, where: str = DESCRIPTION_FILE) -> Description:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object of tensor name -> quantization type")
    for field, feature in FEATURE_FIELDS.items():
        if raw.get(field):
            raise CheckpointError(f"{where}: {field} {raw[field]!r}: {feature} is not supported (moerun runs "
                                  f"W8A8_DYNAMIC weights with a float KV cache: use the w8a8, not the w8a8c8, export)")
    quant_type = raw.get("model_quant_type")
    if quant_type is None:
        raise CheckpointError(f"{where}: missing model_quant_type (msModelSlim writes it, e.g. {W8A8_DYNAMIC!r})")
    if quant_type not in SUPPORTED_TYPES:
        if quant_type == "W8A8":
            raise CheckpointError(f"{where}: model_quant_type W8A8: {STATIC_W8A8_REFUSAL}")
        raise CheckpointError(f"{where}: model_quant_type {quant_type!r} is not supported (allowed: "
                              f"{', '.join(SUPPORTED_TYPES)})")
    version = raw.get("version")
    if version is not None and not isinstance(version, str):
        raise CheckpointError(f"{where}: version must be a string like {FORMAT_VERSION!r}, got {version!r}")
    group_size = raw.get("group_size", 0)
    if group_size not in (0, None):
        raise CheckpointError(f"{where}: group_size {group_size!r}: per-group weight scales are not supported "
                              f"(W8A8_DYNAMIC here is per output channel, group_size 0)")
    metadata, optional = raw.get("metadata", {}), raw.get("optional", {})
    if not isinstance(metadata, dict) or not isinstance(optional, dict):
        raise CheckpointError(f"{where}: metadata and optional must be JSON objects")
    if "quarot" in metadata:
        raise CheckpointError(f"{where}: metadata.quarot: an online QuaRot rotation (applied at run time) is not "
                              f"supported; moerun takes the offline rotation baked into the weights")
    tensors = {}
    for name, value in raw.items():
        if name in DESCRIPTIVE_FIELDS or name in FEATURE_FIELDS:
            continue
        if value == "W8A8":
            raise CheckpointError(f"{where}: {name}: {STATIC_W8A8_REFUSAL}")
        if value not in SUPPORTED_TYPES:
            known = value in MSMODELSLIM_TYPES
            raise CheckpointError(f"{where}: {name}: quantization type {value!r} is "
                                  f"{'not supported' if known else 'unknown'} (allowed: {', '.join(SUPPORTED_TYPES)})")
        tensors[name] = value
    return Description(model_quant_type=quant_type, tensors=tensors)


def expected_tensors(float_expected: dict[str, TensorSpec], description: Description) -> dict[str, TensorSpec]:
    """The tensors a W8A8 checkpoint must hold, from those its float original holds (name -> (shape, dtype)):
    each linear the description marks W8A8_DYNAMIC becomes an int8 weight with fp32 [out, 1] scale and offset."""
    expected: dict[str, TensorSpec] = {}
    expert_types: dict[str, set[str]] = {}
    for name, (shape, dtype) in float_expected.items():
        if dtype not in (None, *FLOAT_DTYPES):
            raise CheckpointError(f"{name}: config.json declares {dtype} weights (quantization_config), but the "
                                  f"folder is a W8A8 checkpoint ({DESCRIPTION_FILE}); msModelSlim removes "
                                  f"quantization_config from config.json")
        quant_type = description.tensors.get(name, FLOAT)
        expert = EXPERT.match(name)
        if expert:
            expert_types.setdefault(expert.group(1), set()).add(quant_type)
        if quant_type != W8A8_DYNAMIC:
            expected[name] = (shape, dtype)
            continue
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or not QUANTIZABLE.search(module):
            raise CheckpointError(f"{name}: {DESCRIPTION_FILE} marks it {W8A8_DYNAMIC}, but it must stay {FLOAT} "
                                  f"(only attention projections and expert weights are quantized)")
        rows = shape[0]
        expected[name] = (shape, "I8")
        for suffix in QUANT_SUFFIXES:
            expected[f"{module}.{suffix}"] = ((rows, 1), "F32")
    for moe, types in expert_types.items():
        if len(types) > 1:
            raise CheckpointError(f"{moe}.experts: mixes {' and '.join(sorted(types))} weights; one layer's "
                                  f"experts must share one format (they run as one stack)")
    return expected


def check_description_matches(description: Description, stored: dict[str, Path]) -> None:
    """Every stored tensor is described and every described tensor is stored; a quantized module's scale and offset
    are described as W8A8_DYNAMIC too. stored: tensor name -> its file."""
    for name, file in sorted(stored.items()):
        if name not in description.tensors:
            raise CheckpointError(f"{name}: stored in {file.name} but missing from {DESCRIPTION_FILE}")
    for name, quant_type in sorted(description.tensors.items()):
        if name not in stored:
            raise CheckpointError(f"{name}: listed in {DESCRIPTION_FILE} as {quant_type} but in no weights file")
        module, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES and description.is_quantized(module) and quant_type != W8A8_DYNAMIC:
            raise CheckpointError(f"{name}: {DESCRIPTION_FILE} says {quant_type}, but {module}.weight is "
                                  f"{W8A8_DYNAMIC}: its scale and offset are {W8A8_DYNAMIC} too")


def description_json(tensors: dict[str, str], model_quant_type: str) -> dict[str, Any]:
    """A description as msModelSlim's saver writes it (per-tensor entries, then the global fields)."""
    return {**tensors, "version": FORMAT_VERSION, "model_quant_type": model_quant_type, "metadata": {},
            "group_size": 0, "optional": {}}
