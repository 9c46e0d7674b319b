"""The msModelSlim W8A8 format (runtime/w8a8_format.py, runtime/w8a8_weights.py): a valid export loads, and every
malformed description or tensor is refused with one line naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from w8a8_checkpoints import W8A8Loader

from moerun.backends.cpu.backend import CpuBackend
from moerun.backends.errors import CheckpointError
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.model_config import load_model_config
from moerun.runtime.w8a8_format import parse_description

Q = "model.layers.1.self_attn.q_proj"
W2 = "model.layers.0.block_sparse_moe.experts.3.w2"
GATE = "model.layers.0.block_sparse_moe.gate.weight"


def load(folder):
    cfg = load_model_config(folder)
    return W8A8Loader(Checkpoint(folder), cfg, CpuBackend({}, torch.float32)).load(cfg.num_layers)


@pytest.fixture(scope="module")
def export(w8a8_checkpoint):
    folder, _ = w8a8_checkpoint("gqa4_half_rope", torch.float32)
    return folder


@pytest.fixture
def broken(export, tmp_path):
    """broken(tensors=..., description=..., config=...) -> a copy of the export with these changes: tensors maps a
    name to its new tensor (None: removed from the file, its index and, unless description says otherwise, the
    description); description(dict) edits the description; config(dict) edits config.json."""

    def make(tensors=None, description=None, config=None):
        folder = tmp_path / "broken"
        shutil.copytree(export, folder)
        desc_path, index_path = folder / "quant_model_description.json", folder / "quant_model_weights.safetensors.index.json"
        desc, index = json.loads(desc_path.read_text()), json.loads(index_path.read_text())
        for name, tensor in (tensors or {}).items():
            shard = folder / index["weight_map"][name]
            with safe_open(str(shard), "pt") as f:
                content = {k: f.get_tensor(k) for k in f.keys()}
            if tensor is None:
                del content[name], index["weight_map"][name], desc[name]
            else:
                content[name] = tensor
            save_file(content, str(shard), metadata={"format": "pt"})
        if description:
            description(desc)
        if config:
            cfg = json.loads((folder / "config.json").read_text())
            config(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))
        desc_path.write_text(json.dumps(desc))
        index_path.write_text(json.dumps(index))
        return folder

    return make


def test_a_valid_export_loads(export):
    weights = load(export)
    assert weights.layers[0].q_proj.weight.dtype == torch.int8 and weights.layers[0].experts.w13.dtype == torch.int8
    assert weights.layers[0].router.dtype == torch.float32 and weights.embed.dtype == torch.float32


def edit(**entries):
    return lambda desc: desc.update(entries)


CASES = {
    "static W8A8 entry": (dict(description=edit(**{f"{Q}.weight": "W8A8"})), rf"{Q}\.weight: static W8A8 .*W8A8_DYNAMIC"),
    "static W8A8 model": (dict(description=edit(model_quant_type="W8A8")), "model_quant_type W8A8: static W8A8"),
    "other msModelSlim type": (dict(description=edit(**{f"{Q}.weight": "W4A8_DYNAMIC"})),
                               r"'W4A8_DYNAMIC' is not supported \(allowed: W8A8_DYNAMIC, FLOAT\)"),
    "unknown type": (dict(description=edit(**{f"{Q}.weight": "W9A9"})), "'W9A9' is unknown"),
    "int8 KV cache": (dict(description=edit(kv_cache_type="C8")), "kv_cache_type 'C8': KV-cache quantization"),
    "per-group scales": (dict(description=edit(group_size=128)), "group_size 128: per-group"),
    "online rotation": (dict(description=edit(metadata={"quarot": {}})), "metadata.quarot: an online QuaRot"),
    "quantized router": (dict(description=edit(**{GATE: "W8A8_DYNAMIC"})), rf"{GATE}: .* must stay FLOAT"),
    "tensor not described": (dict(description=lambda d: d.pop(f"{Q}.weight_offset")),
                             rf"{Q}\.weight_offset: stored in .* but missing from quant_model_description\.json"),
    "described tensor not stored": (dict(description=edit(**{"model.layers.0.extra.weight": "FLOAT"})),
                                    r"model\.layers\.0\.extra\.weight: listed in .* but in no weights file"),
    "missing scale": (dict(tensors={f"{Q}.weight_scale": None}), rf"{Q}\.weight_scale: missing from the checkpoint"),
    "float weight": (dict(tensors={f"{Q}.weight": torch.zeros(128, 64)}), rf"{Q}\.weight: dtype F32 .*expected I8"),
    "flat scale": (dict(tensors={f"{Q}.weight_scale": torch.ones(128)}), rf"{Q}\.weight_scale: shape \[128\] .*\[128, 1\]"),
    "int8 scale": (dict(tensors={f"{W2}.weight_scale": torch.ones(64, 1, dtype=torch.int8)}),
                   rf"{W2}\.weight_scale: dtype I8 .*expected F32"),
    "nonzero offset": (dict(tensors={f"{Q}.weight_offset": torch.full((128, 1), 3.0)}),
                       rf"{Q}\.weight_offset: nonzero .*asymmetric"),
    "zero scale": (dict(tensors={f"{W2}.weight_scale": torch.zeros(64, 1)}), rf"{W2}\.weight_scale: holds zero"),
    "scale described FLOAT": (dict(description=edit(**{f"{Q}.weight_scale": "FLOAT"})),
                              rf"{Q}\.weight_scale: .* says FLOAT, but {Q}\.weight is W8A8_DYNAMIC"),
    "experts of one layer mixed": (dict(tensors={f"{W2}.weight": torch.zeros(64, 32), f"{W2}.weight_scale": None,
                                                 f"{W2}.weight_offset": None}, description=edit(**{f"{W2}.weight": "FLOAT"})),
                                   r"model\.layers\.0\.block_sparse_moe\.experts: mixes FLOAT and W8A8_DYNAMIC"),
    "FP8 config": (dict(config=lambda c: c.update(quantization_config={
        "quant_method": "fp8", "weight_block_size": [16, 16], "modules_to_not_convert": ["gate", "lm_head"]})),
        "declares F8_E4M3 weights .*removes quantization_config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_exports_are_refused_in_one_line(case, broken):
    change, message = CASES[case]
    folder = broken(**change)
    with pytest.raises(CheckpointError, match=message) as info:
        load(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw,message", [
    ("[]", "expected a JSON object"),
    ({"model_quant_type": "W8A8_DYNAMIC", "version": 1}, "version must be a string"),
    ({"model_quant_type": "W8A8_DYNAMIC", "optional": []}, "must be JSON objects"),
    ({"x.weight": "FLOAT"}, "missing model_quant_type"),
], ids=["not an object", "numeric version", "optional not an object", "no model_quant_type"])
def test_description_fields_are_checked(raw, message):
    with pytest.raises(CheckpointError, match=message):
        parse_description(json.loads(raw) if isinstance(raw, str) else raw)


def test_a_description_that_is_not_json_is_one_line(export, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(export, folder)
    (folder / "quant_model_description.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="quant_model_description.json: not valid JSON"):
        load(folder)


def test_msmodelslim_shard_and_index_names_are_read(export):
    ckpt = Checkpoint(export)
    assert ckpt.index_name == "quant_model_weights.safetensors.index.json"
    assert {p.name for p in ckpt.file_of.values()} == {"quant_model_weights-00001-of-00001.safetensors"}
