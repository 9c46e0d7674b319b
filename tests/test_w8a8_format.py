"""The msModelSlim W8A8 format (runtime/w8a8_format.py, runtime/w8a8_weights.py, read by runtime/loader.py): every
malformed description or tensor is refused by `moerun smoke` with one line naming it, exit 2."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from conftest import run_yaml
from safetensors import safe_open
from safetensors.torch import save_file

from moerun.backends.errors import CheckpointError
from moerun.runtime.checkpoint import Checkpoint
from moerun.runtime.cli import main
from moerun.runtime.w8a8_format import parse_description

Q = "model.layers.1.self_attn.q_proj"
W2 = "model.layers.0.block_sparse_moe.experts.3.w2"
GATE = "model.layers.0.block_sparse_moe.gate.weight"


def smoke_error(folder, capsys) -> str:
    """`moerun smoke` on a plain YAML over the folder: it must fail with exit 2 and one error line (beside the
    progress label), returned."""
    config = folder.parent / "run.yaml"
    config.write_text(yaml.safe_dump(run_yaml(folder)))
    capsys.readouterr()
    assert main(["smoke", "-c", str(config), "--steps", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moerun: error: ")]
    assert len(errors) == 1, errors
    return errors[0]


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
    "missing scale": (dict(tensors={f"{Q}.weight_scale": None}), rf"{Q}\.weight_scale: missing from checkpoint"),
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
def test_malformed_exports_are_refused_in_one_line(case, broken, capsys):
    change, message = CASES[case]
    assert re.search(message, smoke_error(broken(**change), capsys))


@pytest.mark.parametrize("raw,message", [
    ("[]", "expected a JSON object"),
    ({"model_quant_type": "W8A8_DYNAMIC", "version": 1}, "version must be a string"),
    ({"model_quant_type": "W8A8_DYNAMIC", "optional": []}, "must be JSON objects"),
    ({"x.weight": "FLOAT"}, "missing model_quant_type"),
], ids=["not an object", "numeric version", "optional not an object", "no model_quant_type"])
def test_description_fields_are_checked(raw, message):
    with pytest.raises(CheckpointError, match=message):
        parse_description(json.loads(raw) if isinstance(raw, str) else raw)


def test_a_description_that_is_not_json_is_one_line(broken, capsys):
    folder = broken()
    (folder / "quant_model_description.json").write_text("{not json")
    assert "quant_model_description.json: not valid JSON" in smoke_error(folder, capsys)


def test_weights_without_their_description_are_refused_by_name(broken, capsys):
    """msModelSlim's weights files without quant_model_description.json: named as missing, not as a float
    checkpoint's hundreds of stray tensors."""
    folder = broken()
    (folder / "quant_model_description.json").unlink()
    assert "quant_model_description.json: missing (a W8A8 checkpoint has" in smoke_error(folder, capsys)


def test_msmodelslim_shard_and_index_names_are_read(export):
    ckpt = Checkpoint(export)
    assert ckpt.index_name == "quant_model_weights.safetensors.index.json"
    assert {p.name for p in ckpt.file_of.values()} == {"quant_model_weights-00001-of-00001.safetensors"}
