"""`moerun verify` against moerun's own server, faithful configurations and deliberately degraded servers, each
judged through the same path as tests/test_verify.py (moerun serve's app on a loopback port, verify in-process).
Prints one line per run and the table of detection rates and margins that docs/fidelity.md shows.

    python tests/verify_sweep.py [--shapes gqa4_half_rope,...] [--seeds 4] [--probe-tokens 16]
    python tests/verify_sweep.py --trained-demo [--answer-tokens 160]

The first: many small transformers-saved checkpoints (random weights). The second: the trained demo model, which
reasons and calls tools, so the tool-calling and reasoning checks have answers to judge; servers that mangle its
answers (argument keys sorted, calls left in the content, reasoning left in the content) join the degradations.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import degrade  # noqa: E402
import hf_checkpoints  # noqa: E402
from verify_servers import (WEIGHT_CHANGES, calls_left_in_content, chat_checkpoint, degraded_copy,  # noqa: E402
                            engine_for, run_verify, served, sort_argument_keys, write_manifest)

FAITHFUL = [("cpu float32", "cpu", "float32"), ("cpu bfloat16", "cpu", "bfloat16"),
            ("emulated Ascend bfloat16", "ascend", "bfloat16")]
NO_ECHO = [("emulated Ascend bfloat16, no echo", "ascend", None), ("q8, no echo", "cpu", "q8"),
           ("noise-1pct, no echo", "cpu", "noise-1pct")]
MANGLING = [("sorted argument keys", {"rewrite": sort_argument_keys}), ("calls left in the content",
            {"rewrite": calls_left_in_content}), ("--reasoning-mode append_think", {"reasoning": "append_think"}),
            ("--reasoning-mode off", {"reasoning": "off"})]


class Sweep:
    def __init__(self, root: Path):
        self.root = root
        self.runs = collections.defaultdict(list)  # server -> [(checks not passed, KL ratio, top-1 delta, detail)]

    def run(self, label: str, name: str, manifest: Path, folder: Path, backend: str = "cpu",
            dtype: str = "bfloat16", *extra: str, **server) -> None:
        with served(engine_for(folder, backend, dtype), **server) as url:
            code, report, _ = run_verify(url, manifest, self.root / f"{label}_{name}.json", *extra)
        checks = {c["name"]: c for c in report["checks"]}
        f = checks["logprobs"]["figures"] if "logprobs" in checks else None
        ratio = float(f["endpoint_median_kl"]) / f["floor_median_kl"] if f else float("nan")
        top1 = f["endpoint_top1"] - f["floor_top1"] if f else float("nan")
        failing = ",".join(n for n, c in checks.items() if c["verdict"] != "PASS") or "none"
        detail = "; ".join(c["failures"][0] for c in checks.values() if c["verdict"] != "PASS" and c["failures"])
        answers = " | ".join(checks[n]["summary"] for n in ("tools", "reasoning") if n in checks)
        self.runs[name].append((failing, ratio, top1, detail))
        print(f"{label} {name}: exit {code}, not passed: {failing}, KL x{ratio:.2f} of the floor, top-1 {top1:+.4f}; "
              f"{answers}; {detail[:300]}", flush=True)

    def table(self) -> None:
        print("\n| server | runs | checks not passed (runs) | median KL / floor's | top-1 minus floor's |")
        print("|---|---|---|---|---|")
        for name, results in self.runs.items():
            counts = collections.Counter(r[0] for r in results)
            ratios, deltas = [r[1] for r in results], [r[2] for r in results]
            print(f"| {name} | {len(results)} | {', '.join(f'{k} ({v})' for k, v in counts.most_common())} | "
                  f"{min(ratios):.2f} - {max(ratios):.2f} | {min(deltas):+.3f} - {max(deltas):+.3f} |")


def small_checkpoints(sweep: Sweep, shapes: list[str], seeds: int, probe_tokens: int) -> None:
    root = sweep.root
    for shape in shapes:
        for seed in range(seeds):
            label = f"{shape}_{seed}"
            folder = chat_checkpoint(shape, root / label, seed)
            manifest = write_manifest(folder, root / f"{label}.json", probe_tokens, 16)
            for name, backend, dtype in FAITHFUL:
                sweep.run(label, name, manifest, folder, backend, dtype)
            changes = list(WEIGHT_CHANGES)
            if seed == 0:  # the template counts do not depend on the weights: one checkpoint per shape
                changes += list(degrade.TEMPLATE_CHANGES)
            for change in changes:
                copy = degraded_copy(folder, root / f"{label}_{change}", change, shape, seed)
                sweep.run(label, change, manifest, copy)
            for name, backend, change in NO_ECHO:
                path = folder if change is None else root / f"{label}_{change}"
                sweep.run(label, name, manifest, path, backend, "bfloat16", "--checks", "logprobs", refuse_echo=True)


def trained_demo(sweep: Sweep, probe_tokens: int, answer_tokens: int) -> None:
    from moerun.runtime.trained_demo import trained_demo_folder

    folder, root, label = trained_demo_folder(), sweep.root, "trained-demo"
    manifest = write_manifest(folder, root / f"{label}.json", probe_tokens, answer_tokens)
    for name, backend, dtype in FAITHFUL:
        sweep.run(label, name, manifest, folder, backend, dtype)
    for change in ("q4", "q8", "noise-1pct", *degrade.TEMPLATE_CHANGES):
        sweep.run(label, change, manifest, degraded_copy(folder, root / f"{label}_{change}", change, "", 0))
    for name, server in MANGLING:
        sweep.run(label, name, manifest, folder, "cpu", "bfloat16", **server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(hf_checkpoints.SHAPES))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--probe-tokens", type=int, default=16)
    parser.add_argument("--trained-demo", action="store_true")
    parser.add_argument("--answer-tokens", type=int, default=160)
    args = parser.parse_args()
    sweep = Sweep(Path(tempfile.mkdtemp(prefix="verify_sweep_")))
    if args.trained_demo:
        trained_demo(sweep, args.probe_tokens, args.answer_tokens)
    else:
        small_checkpoints(sweep, args.shapes.split(","), args.seeds, args.probe_tokens)
    sweep.table()


if __name__ == "__main__":
    main()
