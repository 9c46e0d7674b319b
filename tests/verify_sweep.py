"""`moerun verify` against moerun's own server over many small transformers-saved checkpoints: faithful
configurations and deliberately degraded servers, each judged through the same path as tests/test_verify.py
(moerun serve's app on a loopback port, verify in-process). Prints one line per run and the table of detection
rates and margins that docs/fidelity.md shows.

    python tests/verify_sweep.py [--shapes gqa4_half_rope,...] [--seeds 4] [--probe-tokens 16]
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
from verify_servers import (WEIGHT_CHANGES, chat_checkpoint, degraded_copy, engine_for, run_verify,  # noqa: E402
                            served, write_manifest)

FAITHFUL = [("cpu float32", "cpu", "float32"), ("cpu bfloat16", "cpu", "bfloat16"),
            ("emulated Ascend bfloat16", "ascend", "bfloat16")]
NO_ECHO = [("emulated Ascend bfloat16, no echo", "ascend", None), ("q8, no echo", "cpu", "q8"),
           ("noise-1pct, no echo", "cpu", "noise-1pct")]


def logprob_figures(report: dict) -> tuple[float, float]:
    """(the endpoint's median KL over the floor's, its top-1 agreement minus the floor's)."""
    f = next(c for c in report["checks"] if c["name"] == "logprobs")["figures"]
    return float(f["endpoint_median_kl"]) / f["floor_median_kl"], f["endpoint_top1"] - f["floor_top1"]


def failed(report: dict) -> str:
    names = [c["name"] for c in report["checks"] if c["verdict"] != "PASS"]
    return ",".join(names) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(hf_checkpoints.SHAPES))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--probe-tokens", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="verify_sweep_"))
    runs = collections.defaultdict(list)  # server -> [(failed checks, KL ratio, top-1 delta, template failure)]
    for shape in args.shapes.split(","):
        for seed in range(args.seeds):
            base = root / f"{shape}_{seed}"
            folder = chat_checkpoint(shape, base, seed)
            manifest = write_manifest(folder, base.with_suffix(".json"), args.probe_tokens, 16)
            servers = [(name, folder, backend, dtype, False) for name, backend, dtype in FAITHFUL]
            servers += [(change, degraded_copy(folder, root / f"{shape}_{seed}_{change}", change, shape, seed),
                         "cpu", "bfloat16", False) for change in WEIGHT_CHANGES]
            if seed == 0:  # the template counts do not depend on the weights: one checkpoint per shape
                servers += [(change, degraded_copy(folder, root / f"{shape}_{seed}_{change}", change, shape, seed),
                             "cpu", "bfloat16", False) for change in degrade.TEMPLATE_CHANGES]
            servers += [(name, folder if change is None else root / f"{shape}_{seed}_{change}", backend, "bfloat16",
                         True) for name, backend, change in NO_ECHO]
            for name, path, backend, dtype, no_echo in servers:
                with served(engine_for(path, backend, dtype), refuse_echo=no_echo) as url:
                    extra = ("--checks", "logprobs") if no_echo else ()
                    code, report, _ = run_verify(url, manifest, base.with_name(f"{base.name}_{name}.json"), *extra)
                ratio, top1 = logprob_figures(report)
                template = next((c["failures"][0] for c in report["checks"]
                                 if c["name"] == "template" and c["failures"]), "")
                runs[name].append((failed(report), ratio, top1, template))
                print(f"{shape} {seed} {name}: exit {code}, not passed: {failed(report)}, KL x{ratio:.2f} of the floor, "
                      f"top-1 {top1:+.4f} {template}", flush=True)
    print("\n| server | runs | checks not passed (runs) | median KL / floor's | top-1 minus floor's |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        counts = collections.Counter(r[0] for r in results)
        ratios, deltas = [r[1] for r in results], [r[2] for r in results]
        print(f"| {name} | {len(results)} | {', '.join(f'{k} ({v})' for k, v in counts.most_common())} | "
              f"{min(ratios):.2f} - {max(ratios):.2f} | {min(deltas):+.3f} - {max(deltas):+.3f} |")


if __name__ == "__main__":
    main()
