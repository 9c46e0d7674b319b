"""`moerun parity`: the calibrated verdict against known-faithful and known-degraded candidates, the per-layer report
that locates a divergence, the fixed verdict, and the order of work (everything checked first, one engine alive)."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch
from conftest import run_yaml
from degrade import write_fake_quantized, write_layer_noise
from safetensors.torch import load_file, save_file

from moerun.runtime import engine as engine_module
from moerun.runtime.cli import main
from moerun.runtime.parity import Calibration, calibrated_verdict, compare_logits

# Two sequences of 16 tokens (32 positions): enough for the median KL to settle on these models.
TOKENS = ["--token-ids", "1,5,9,13,17,21,25,29,33,37,41,45,49,53,57,61",
          "--token-ids", "2,7,12,19,23,31,43,47,53,59,61,67,71,73,79,83"]


def _stage_rows(out: str) -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith(("layer", "final"))}


def _metric(out: str, name: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith(name))
    return line[len(name):].split()


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, hf_checkpoint):
    """A transformers-saved bf16 checkpoint and its 4-bit fake-quantized copy (group 128, symmetric)."""
    folder, _ = hf_checkpoint("m2_like", torch.bfloat16)
    quantized = tmp_path_factory.mktemp("q4") / "model"
    write_fake_quantized(folder, quantized, bits=4)
    return folder, quantized


def test_calibrated_verdict_passes_a_faithful_bf16_candidate(bf16_model, write_yaml, capsys):
    """Emulated Ascend in bf16 runs the same model with other kernels: as close to the high-precision run as the
    CPU backend in bf16 is, although the two bf16 runs differ from each other."""
    folder, _ = bf16_model
    ref = write_yaml(run_yaml(folder, dtype="bfloat16"), "cpu.yaml")
    cand = write_yaml(run_yaml(folder, "ascend", "bfloat16", block_size=128, ascend={"emulate": True}), "asc.yaml")
    assert main(["parity", "-c", str(ref), "-c", str(cand), *TOKENS]) == 0
    out = capsys.readouterr().out
    floor, candidate, _, limit = _metric(out, "median KL(y||x)")[:4]
    assert 0 < float(floor) and float(candidate) <= float(limit)
    assert "HP = A's checkpoint on cpu in float32" in out and out.rstrip().endswith("PASS")


def test_calibrated_verdict_fails_a_4bit_candidate(bf16_model, write_yaml, capsys):
    folder, quantized = bf16_model
    ref = write_yaml(run_yaml(folder, dtype="bfloat16"), "cpu.yaml")
    cand = write_yaml(run_yaml(quantized, dtype="bfloat16"), "q4.yaml")
    assert main(["parity", "-c", str(ref), "-c", str(cand), *TOKENS]) == 1
    out = capsys.readouterr().out
    floor, candidate, *_ = _metric(out, "median KL(y||x)")
    assert float(candidate) > 100 * float(floor)
    assert "FAIL: median KL(HP||candidate)" in out


def test_per_layer_report_names_the_layer_whose_weights_got_noise(hf_checkpoint, write_yaml, tmp_path, capsys):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.bfloat16)
    noisy = tmp_path / "noisy"
    write_layer_noise(folder, noisy, layer=1, relative=0.05)
    ref = write_yaml(run_yaml(folder, dtype="bfloat16"), "a.yaml")
    cand = write_yaml(run_yaml(noisy, dtype="bfloat16"), "b.yaml")
    main(["parity", "-c", str(ref), "-c", str(cand), *TOKENS, "--per-layer"])
    out = capsys.readouterr().out
    assert "B leaves the floor first at layer 1, attention (layer1.attention)" in out
    rows = _stage_rows(out)
    for stage in ("layer0.attention", "layer0.router_logits", "layer0.moe"):  # untouched layer: bit-identical runs
        assert rows[stage][0] == rows[stage][1], (stage, rows[stage])
    assert rows["layer1.attention"][-1] == "floor"  # "<- leaves the floor"


def test_fixed_thresholds_compare_the_two_runs_directly(hf_checkpoint, write_yaml, tmp_path, capsys, monkeypatch):
    """Any fixed threshold switches to the fixed verdict: no high-precision run, the old A-vs-B table. Layer 1's
    experts change and nothing before them does, so the per-layer table is exactly zero up to layer1.moe."""
    built = _count_engines(monkeypatch)
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    for e in range(16):
        tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] *= 1.5
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    a = write_yaml(run_yaml(folder), "a.yaml")
    b = write_yaml(run_yaml(changed), "b.yaml")
    code = main(["parity", "-c", str(a), "-c", str(b), "--token-ids", "1,2,3,4,5,6,7,8", "--per-layer", "--mean-kl", "1e-3"])
    out = capsys.readouterr().out
    assert code == 1 and built["count"] == 2 and "verdict: fixed thresholds" in out
    rows = _stage_rows(out)
    for stage in ("layer0.attention", "layer0.router_logits", "layer0.moe", "layer1.attention", "layer1.router_logits"):
        assert float(rows[stage][0]) == 0.0 and rows[stage][1] == "1.000000", (stage, rows[stage])
    assert float(rows["layer1.moe"][0]) > 0.1


def _count_engines(monkeypatch) -> dict:
    """Wrap Engine.__init__: count engines built and the most alive at once (weak references, after a collection)."""
    state = {"count": 0, "alive": weakref.WeakSet(), "max_alive": 0}
    original = engine_module.Engine.__init__

    def counting_init(self, *args, **kwargs):
        gc.collect()
        original(self, *args, **kwargs)
        state["count"] += 1
        state["alive"].add(self)
        state["max_alive"] = max(state["max_alive"], len(state["alive"]))

    monkeypatch.setattr(engine_module.Engine, "__init__", counting_init)
    return state


@pytest.mark.parametrize("bad", ["yaml", "checkpoint", "backend_option", "token"])
def test_a_bad_candidate_is_reported_before_any_engine_is_built(bad, hf_checkpoint, write_yaml, tmp_path, capsys,
                                                                monkeypatch):
    built = _count_engines(monkeypatch)
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    ref = write_yaml(run_yaml(folder), "ref.yaml")
    cand_data = run_yaml(folder)
    token_ids = "1,2,3"
    if bad == "checkpoint":
        cand_data["model"]["path"] = str(tmp_path / "missing")
    if bad == "backend_option":
        cand_data["cpu"] = {"weights": "sometimes"}
    if bad == "token":
        token_ids = "1,2,999"
    cand = write_yaml(cand_data, "cand.yaml")
    if bad == "yaml":
        cand.write_text("backend: cpu\nmodel: [unclosed\n")
    capsys.readouterr()
    assert main(["parity", "-c", str(ref), "-c", str(cand), "--token-ids", token_ids]) == 2
    err = capsys.readouterr().err.strip()
    assert built["count"] == 0 and len(err.splitlines()) == 1, err
    assert ("999" in err) if bad == "token" else ("cand.yaml" in err or "missing" in err), err


def test_under_torchrun_it_is_one_line(hf_checkpoint, write_yaml, capsys, monkeypatch):
    """Its engines load one after another, which a world of ranks (each engine joins and leaves it) cannot follow."""
    built = _count_engines(monkeypatch)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    a = write_yaml(run_yaml(folder), "a.yaml")
    assert main(["parity", "-c", str(a), "-c", str(a), "--token-ids", "1,2,3,4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run it without torchrun" in err[0] and built["count"] == 0


def test_one_engine_alive_at_a_time(hf_checkpoint, write_yaml, capsys, monkeypatch):
    built = _count_engines(monkeypatch)
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    a = write_yaml(run_yaml(folder), "a.yaml")
    assert main(["parity", "-c", str(a), "-c", str(a), "--token-ids", "1,2,3,4", "--per-layer"]) == 0
    assert built["count"] == 3 and built["max_alive"] == 1


def test_prompts_file_uses_the_reference_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nThe quick brown fox\n")
    assert main(["parity", "-c", str(cfg), "-c", str(cfg), "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and _metric(out, "top-1 agreement")[:2] == ["1.0000", "1.0000"]


def test_parity_metrics_on_known_distributions():
    """KL, top-1 and top-5 figures against values worked out by hand."""
    a = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625, 1e-9]]))
    b = torch.log(torch.tensor([[0.25, 0.5, 0.125, 0.0625, 0.0625, 1e-9]]))
    r = compare_logits(a, b)
    expected_kl = 0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5))
    assert abs(r.mean_kl - expected_kl.item()) < 1e-6 and abs(r.median_kl - expected_kl.item()) < 1e-6
    assert r.top1_agreement == 0.0 and r.top5_overlap == 1.0
    assert not r.passed and any("top-1" in f for f in r.failures)


def test_calibrated_verdict_formula_on_constructed_logits():
    """Candidate and reference as known perturbations of HP: the verdict follows median KL <= k x floor + epsilon,
    and the top-1 margin is 2 sqrt(2 p (1 - p) / N) + 1/N at p = (agreeing + 1) / (N + 2)."""
    gen = torch.Generator().manual_seed(0)
    hp = 3 * torch.randn(400, 50, generator=gen)
    ref = hp + 0.01 * torch.randn(hp.shape, generator=gen)
    # KL is quadratic in the perturbation: 1.5x the amplitude is 2.25x the KL (passes at k 4), 3x is 9x (fails).
    close = hp + 0.015 * torch.randn(hp.shape, generator=gen)
    far = hp + 0.03 * torch.randn(hp.shape, generator=gen)
    assert calibrated_verdict(hp, ref, close).passed
    verdict = calibrated_verdict(hp, ref, far)
    assert not verdict.passed and 6 < verdict.candidate.median_kl / verdict.floor.median_kl < 13
    n, agreeing = verdict.floor.positions, round(verdict.floor.top1_agreement * 400)
    p = (agreeing + 1) / (n + 2)
    assert Calibration().margin(verdict.floor) == pytest.approx(2 * (2 * p * (1 - p) / n) ** 0.5 + 1 / n)
