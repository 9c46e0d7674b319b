"""scripts/gpu_check.sh, the one command the GPU window runs: its --dry-run (the same steps on the CPU under
Triton's interpreter, tiny sizes) end to end, and its summary's verdicts on a GPU run's files written here by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests", "bench-bf16", "bench-fp8", "bench-hf-compiled"]


def test_dry_run_passes_and_writes_every_file(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=2400)  # above the script's own dry-run budget (1880 s); it uses ~75 s of CPU
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["passed"], proc.stdout[-6000:] + proc.stderr[-3000:]
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert "DRY RUN" in proc.stdout and "PASSED: 5 of 5 steps passed" in proc.stdout
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["moerun_from"] == str(ROOT) and env_info["dry_run"]  # imported from the tree, not installed
    bf16, fp8 = (json.loads((out / f"bench-{n}.json").read_text()) for n in ("bf16", "fp8"))
    assert bf16["machine"]["backend"].startswith("cuda backend on cpu") and "fp8" in fp8["model"]["weights"]
    assert [d["batch"] for d in bf16["decode"]] == [1, 2] and set(bf16["decode"][0]["transformers"]) == {"dynamic", "static"}
    compiled = json.loads((out / "bench-hf-compiled.json").read_text())
    # torch.compile either ran (timed) or the report says why not
    assert "compiled" in compiled["decode"][0].get("transformers", {}) or compiled["transformers"]["missing"]["compiled"]
    assert "skipped" in (out / "gpu_check.log").read_text() and (out / "tests.xml").is_file()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def _write(out: Path, name: str, data) -> None:
    (out / name).write_text(json.dumps(data))


def _bench(rows, prefill=None):
    return {"decode": rows, "prefill": prefill}


def test_summary_reads_targets_and_fails_what_a_gpu_run_must_not_do(tmp_path):
    """A GPU run's files, made up: the verdicts against the targets, and a run whose tests were skipped fails."""
    out = tmp_path
    (out / "steps.tsv").write_text("".join(f"{s}\t0\t10\t100\n" for s in STEPS))
    (out / "tests.xml").write_text('<testsuites><testsuite tests="10" failures="0" errors="0" skipped="0"/></testsuites>')
    peer = {"static": {"median_ms": 30.0}, "dynamic": {"median_ms": 40.0}}
    _write(out, "bench-bf16.json", _bench(
        [{"batch": 1, "step_ms": 2.0, "mbu": 0.45}, {"batch": 64, "step_ms": 5.0, "mbu": 0.55, "transformers": peer,
                                                      "transformers_fastest": "static", "speedup": 6.0}],
        {"tokens": 8192, "mfu": 0.41}))
    _write(out, "bench-fp8.json", _bench([{"batch": 1, "step_ms": 1.3, "mbu": 0.3}]))
    _write(out, "bench-hf-compiled.json", _bench([{"batch": 64, "step_ms": 5.0, "mbu": 0.5,
                                                   "transformers": {"compiled": {"median_ms": 20.0}}}]))
    env = {**os.environ, "PYTHONPATH": str(_links(tmp_path))}
    run = lambda: subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(out)],  # noqa: E731
                                 capture_output=True, text=True, timeout=120, env=env)
    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    met = {t["target"].split(":")[0]: (t["met"], t["measured"]) for t in summary["targets"]}
    assert met["decode b64, bf16"] == (False, 0.55)
    assert met["decode b1, bf16, CUDA graphs"] == (True, 0.45)
    assert met["decode b64"] == (False, 4.0)  # against the fastest of all variants: compiled, 20 ms / 5 ms
    assert met["decode b1"] == (False, pytest.approx(0.65))  # 1.3 / 2.0
    assert met["prefill 8192, bf16"] == (True, 0.41)
    (out / "tests.xml").write_text('<testsuites><testsuite tests="10" failures="0" errors="0" skipped="2"/></testsuites>')
    proc = run()
    assert proc.returncode == 1 and "a GPU run must skip nothing" in proc.stdout


def _links(tmp_path: Path) -> Path:
    """moerun importable from this tree the way gpu_check.sh makes it (the package-dir mapping as links)."""
    links = tmp_path / "links"
    (links / "moerun").mkdir(parents=True)
    for pkg in ("runtime", "backends", "configs"):
        (links / "moerun" / pkg).symlink_to(ROOT / pkg)
    return links
