"""`moerun plan` on the shipped MiniMax-M2.7 deployment configs: each parses and plans from config.json alone (their
model.path is a placeholder, pointed here at a folder holding only M2.7's config.json), and its own layout fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from m27_config import write_m27_config

from moerun.runtime.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEVICES = {  # the machine each config is written for
    "m27_a3_16die_bf16.yaml": "910c-64g-die:16",
    "m27_2x_a2_bf16.yaml": "910b-64g:16",
    "m27_a2_bf16.yaml": "910b-64g:8",
    "m27_a2_w8a8.yaml": "910b-64g:8",
    "m27_2x_h200_fp8.yaml": "h200-141g:2",
    "m27_4x_h100_fp8.yaml": "h100-80g:4",
}


def test_every_m27_config_is_planned_here():
    assert set(DEVICES) == {p.name for p in CONFIGS.glob("m27_*.yaml")}


def run_plan(name: str, tmp_path: Path, capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """`moerun plan -c <shipped config> ARGS` -> (exit code, stdout lines, stderr lines)."""
    raw = yaml.safe_load((CONFIGS / name).read_text())
    raw["model"]["path"] = str(write_m27_config(tmp_path / "MiniMax-M2.7", w8a8="w8a8" in name))
    config = tmp_path / name
    config.write_text(yaml.safe_dump(raw))
    code = main(["plan", "-c", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


def planned(name: str, tmp_path: Path, capsys, *extra: str) -> list[str]:
    code, out, _ = run_plan(name, tmp_path, capsys, "--devices", DEVICES[name], *extra)
    assert code == 0
    return out


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_shipped_config_plans_and_its_layout_fits(name, tmp_path, capsys):
    lines = planned(name, tmp_path, capsys)
    chosen = [line for line in lines if line.startswith("*TP")]
    assert len(chosen) == 1 and chosen[0].split()[9] == "yes", "\n".join(lines)  # the fits column
    weights = next(line for line in lines if line.startswith("weights:"))
    held = {"fp8": "fp8", "w8a8": "w8a8 (msModelSlim W8A8_DYNAMIC, run as int8 by the ascend backend)"}
    assert held.get(name.split("_")[-1].removesuffix(".yaml"), "bfloat16 (the FP8 checkpoint dequantized at load") in weights


def test_one_a2_node_in_w8a8_halves_the_weights(tmp_path, capsys):
    bf16 = planned("m27_a2_bf16.yaml", tmp_path, capsys)
    w8a8 = planned("m27_a2_bf16.yaml", tmp_path, capsys, "--weights", "w8a8")
    per_rank = [float(next(line for line in out if line.startswith("*TP")).split()[3]) for out in (bf16, w8a8)]
    assert 1.9 < per_rank[0] / per_rank[1] < 2.0


def test_pure_tp8_on_fp8_is_listed_as_refused(tmp_path, capsys):
    code, out, _ = run_plan("m27_4x_h100_fp8.yaml", tmp_path, capsys, "--devices", "h100-80g:8")
    row = next(line for line in out if line.startswith("TP8 x EP1 "))
    assert code == 0 and "refused" in row and "1536 / 8 = 192 is not a multiple of the FP8 block 128" in row


def test_bad_devices_is_one_line(tmp_path, capsys):
    code, _, err = run_plan("m27_4x_h100_fp8.yaml", tmp_path, capsys, "--devices", "a100:4")
    assert code == 2 and len(err) == 1 and "unknown device kind 'a100'" in err[0]


def test_without_devices_it_plans_this_machine(tmp_path, capsys):
    """No --devices: the config's backend reports its device (the host's memory for cpu), times the ranks the
    layout needs (one here)."""
    config = tmp_path / "demo.yaml"
    config.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32}\n")
    assert main(["plan", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "devices: 1 x cpu (" in out and "*TP1 x EP1" in out
