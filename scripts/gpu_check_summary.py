"""scripts/gpu_check.sh's last step: one table of the steps (passed or why not) and one of the CUDA backend's
targets (docs/performance.md, "Targets") read from the bench JSON files in OUTDIR; written to OUTDIR/summary.json
too. Exit 0 when every step passed; the targets are reported, not enforced (a missed target is a result).

    python scripts/gpu_check_summary.py OUTDIR [--dry-run]
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from moerun.runtime.table import format_table  # gpu_check.sh puts this tree's moerun on PYTHONPATH


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(path: Path) -> dict[str, int] | None:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_results(out: Path, dry_run: bool) -> list[dict[str, Any]]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        ok, note = rc == "0", ""
        if rc == "skipped":
            note = "not run: the time budget was spent"
        elif rc in ("124", "137"):
            note = f"timed out after {limit}s"
        elif not ok:
            note = f"exit code {rc}, see gpu_check.log"
        if name == "tests":
            counts = test_counts(out / "tests.xml")
            if counts is None:
                ok, note = False, note or "no tests.xml"
            else:
                note = (note + "; " if note else "") + ", ".join(f"{counts[k]} {k}" for k in
                                                                 ("passed", "failures", "errors", "skipped"))
                if not dry_run and (counts["skipped"] or not counts["passed"]):
                    ok, note = False, note + " (a GPU run must skip nothing)"
        elif name.startswith("bench") and ok and load(out / f"{name}.json") is None:
            ok, note = False, f"no {name}.json"
        steps.append({"step": name, "passed": ok, "seconds": int(seconds), "limit": int(limit), "note": note})
    return steps


def _row(bench: dict[str, Any] | None, batch: int) -> dict[str, Any] | None:
    return next((d for d in (bench or {}).get("decode", []) if d["batch"] == batch), None)


def targets(out: Path) -> list[dict[str, Any]]:
    bf16, fp8, compiled = (load(out / f"bench-{n}.json") for n in ("bf16", "fp8", "hf-compiled"))
    b1, b64, fp8_b1 = _row(bf16, 1), _row(bf16, 64), _row(fp8, 1)
    rows = []

    def add(target: str, value: float | None, shown: str, goal: str, met: bool | None) -> None:
        rows.append({"target": target, "measured": value, "shown": shown if value is not None else "not measured",
                     "goal": goal, "met": None if value is None else met})

    add("decode b64, bf16: MBU", b64 and b64["mbu"], b64 and f"{100 * b64['mbu']:.1f}%", ">= 60%",
        b64 is not None and b64["mbu"] >= 0.6)
    add("decode b1, bf16, CUDA graphs: MBU", b1 and b1["mbu"], b1 and f"{100 * b1['mbu']:.1f}%", ">= 40%",
        b1 is not None and b1["mbu"] >= 0.4)
    peers = {f"{v} ({name})": t["median_ms"] for name, row in (("bench-bf16", b64), ("bench-hf-compiled", _row(compiled, 64)))
             if row for v, t in row.get("transformers", {}).items()}
    speedup = peers and b64 and min(peers.values()) / b64["step_ms"]
    fastest = peers and min(peers, key=peers.get)
    add("decode b64: speedup over transformers' fastest", speedup or None, speedup and f"{speedup:.2f}x vs {fastest}",
        ">= 5x", bool(speedup) and speedup >= 5)
    ratio = b1 and fp8_b1 and fp8_b1["step_ms"] / b1["step_ms"]
    add("decode b1: FP8 step / bf16 step", ratio, ratio and f"{ratio:.2f} ({fp8_b1['step_ms']:.3f} / {b1['step_ms']:.3f} ms)",
        "<= 0.6", ratio is not None and ratio <= 0.6)
    prefill = (bf16 or {}).get("prefill")
    add(f"prefill {prefill['tokens'] if prefill else 8192}, bf16: MFU", prefill and prefill["mfu"],
        prefill and f"{100 * prefill['mfu']:.1f}%", ">= 40% (8192 tokens)", prefill is not None and prefill["mfu"] >= 0.4)
    return rows


def decode_table(out: Path) -> list[list[str]]:
    rows = []
    for name in ("bf16", "fp8"):
        for d in (load(out / f"bench-{name}.json") or {}).get("decode", []):
            eager = d.get("moerun_eager", {}).get("median_ms")
            rows.append([name, d["batch"], f"{d['step_ms']:.3f}", "-" if eager is None else f"{eager:.3f}",
                         f"{100 * d['mbu']:.1f}%", f"{d['speedup']:.2f}x vs {d['transformers_fastest']}"
                         if "speedup" in d else "-"])
    return rows


def main() -> int:
    out, dry_run = Path(sys.argv[1]), "--dry-run" in sys.argv[2:]
    steps, goals = step_results(out, dry_run), targets(out)
    env = load(out / "env.json") or {}
    gpu = env.get("gpu") or {}
    print(f"gpu_check summary: {out}")
    print(f"{gpu.get('name', 'no GPU')}  torch {env.get('torch')}  triton {env.get('triton')}  "
          f"transformers {env.get('transformers')}")
    if dry_run:
        print("DRY RUN: the CPU, Triton's interpreter, tiny sizes; the figures below say nothing about a GPU")
    print()
    print(format_table(["step", "result", "seconds", "limit", "note"],
                       [[s["step"], "passed" if s["passed"] else "FAILED", s["seconds"], s["limit"], s["note"]]
                        for s in steps]))
    print()
    print(format_table(["target", "measured", "goal", "met"],
                       [[g["target"], g["shown"], g["goal"], {True: "yes", False: "no", None: "-"}[g["met"]]]
                        for g in goals]))
    rows = decode_table(out)
    if rows:
        print()
        print(format_table(["weights", "batch", "graphs ms", "eager ms", "MBU", "speedup"], rows, align="right"))
    passed = bool(steps) and all(s["passed"] for s in steps)
    (out / "summary.json").write_text(json.dumps({"dry_run": dry_run, "passed": passed, "steps": steps,
                                                  "targets": goals}, indent=2) + "\n")
    print(f"\n{'PASSED' if passed else 'FAILED'}: {sum(s['passed'] for s in steps)} of {len(steps)} steps passed")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
