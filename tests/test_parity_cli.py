"""`moerun parity`: the figures it reports, its exit codes, and the per-layer table that locates a divergence."""

from __future__ import annotations

import shutil

import torch
from conftest import run_yaml
from safetensors.torch import load_file, save_file

from moerun.runtime.cli import main
from moerun.runtime.parity import compare_logits


def _rows(out: str) -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("layer") or ln.startswith("final")}


def test_per_layer_table_points_at_the_layer_that_differs(hf_checkpoint, write_yaml, tmp_path, capsys):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    for e in range(16):  # every expert of layer 1 moves; nothing before it does
        tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] *= 1.5
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    a = write_yaml(run_yaml(folder), "a.yaml")
    b = write_yaml(run_yaml(changed), "b.yaml")
    code = main(["parity", "-c", str(a), "-c", str(b), "--token-ids", "1,2,3,4,5,6,7,8", "--per-layer"])
    rows = _rows(capsys.readouterr().out)
    assert code == 1
    for stage in ("layer0.attention", "layer0.router_logits", "layer0.moe", "layer1.attention", "layer1.router_logits"):
        assert float(rows[stage][0]) == 0.0 and rows[stage][1] == "1.000000", (stage, rows[stage])
    assert float(rows["layer1.moe"][0]) > 0.1
    assert rows["layer0.router_logits"][2] == "1.0000"


def test_prompts_file_uses_the_reference_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nThe quick brown fox\n")
    assert main(["parity", "-c", str(cfg), "-c", str(cfg), "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "top-1 agreement     1.0000" in out


def test_parity_metrics_on_known_distributions():
    """KL, top-1 and top-5 figures against values worked out by hand."""
    a = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625, 1e-9]]))
    b = torch.log(torch.tensor([[0.25, 0.5, 0.125, 0.0625, 0.0625, 1e-9]]))
    r = compare_logits(a, b)
    expected_kl = 0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5))
    assert abs(r.mean_kl - expected_kl.item()) < 1e-6
    assert r.top1_agreement == 0.0 and r.top5_overlap == 1.0
    assert not r.passed and any("top-1" in f for f in r.failures)
