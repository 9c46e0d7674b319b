"""Load time and peak memory: moerun's load next to transformers' from_pretrained, on the same FP8 folder.

Each run is a fresh subprocess (so peak RSS is that load's alone), the two loaders alternate (moerun, transformers,
moerun, ...), and the table gives the median and range of the wall time, the checkpoint bytes over the median,
and the peak resident memory against the bytes of the weights each ended up holding.

    python tests/release_checkpoint.py /work/data/loader/m2.7-1layer      # the M2.7 release shape, 1 layer
    python scripts/bench_load.py /work/data/loader/m2.7-1layer --runs 3

moerun: Engine(cpu backend, --dtype, a 16-block KV cache), what `moerun smoke` builds before its checks.
transformers: MiniMaxM2ForCausalLM.from_pretrained(folder, dtype=--dtype) on the CPU, which dequantizes the FP8
weights as it loads (it needs the accelerate package). Before timing, the folder is read once so both start from
a warm page cache, and each run waits until the machine has the memory it needs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOADERS = ("moerun", "transformers")


def child(loader: str, folder: str, dtype_name: str) -> None:
    """One load in this process; prints one JSON line."""
    import torch

    dtype = getattr(torch, dtype_name)
    if loader == "moerun":
        import yaml

        from moerun.runtime.engine import Engine
        from moerun.runtime.run_config import load_run_config
        from moerun.runtime.weights import tensors as weight_tensors

        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "run.yaml"
            config.write_text(yaml.safe_dump({"backend": "cpu", "model": {"path": folder, "dtype": dtype_name},
                                              "kv_cache": {"num_blocks": 16}}))
            run = load_run_config(config)
            start = time.perf_counter()
            engine = Engine(run)
            seconds = time.perf_counter() - start
        tensors = weight_tensors(engine.model.weights)
    else:
        from transformers import MiniMaxM2ForCausalLM

        start = time.perf_counter()
        model = MiniMaxM2ForCausalLM.from_pretrained(folder, dtype=dtype)
        seconds = time.perf_counter() - start
        tensors = [*model.parameters(), *model.buffers()]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    print(json.dumps({"seconds": seconds, "weight_bytes": sum(unique.values()),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def available_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemAvailable"].split()[0]) * 1024


def wait_for_memory(need: int, timeout_s: float) -> None:
    """Other work shares the machine: wait (up to timeout_s) rather than start a load that cannot fit."""
    deadline = time.monotonic() + timeout_s
    while available_bytes() < need:
        if time.monotonic() > deadline:
            sys.exit(f"bench_load: {available_bytes() / 1e9:.1f} GB available, {need / 1e9:.1f} GB needed; gave up")
        print(f"  waiting: {available_bytes() / 1e9:.1f} GB available, {need / 1e9:.1f} GB needed", file=sys.stderr)
        time.sleep(30)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=3, help="timed loads per loader (default 3)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--only", choices=LOADERS, help="time one loader only")
    parser.add_argument("--wait-s", type=float, default=1800, help="longest wait for free memory per run")
    parser.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.folder), args.dtype)

    folder = args.folder.resolve()
    size = checkpoint_bytes(folder)
    loaders = [args.only] if args.only else list(LOADERS)
    warm_page_cache(folder)
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name in loaders}
    for run in range(args.runs):
        for name in loaders if run % 2 == 0 else loaders[::-1]:
            # a load may hold up to ~2.5x the checkpoint: bf16 weights are 1.6x the FP8 bytes, plus transients
            wait_for_memory(int(2.5 * size), args.wait_s)
            out = subprocess.run([sys.executable, __file__, str(folder), "--dtype", args.dtype, "--child", name],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"bench_load: {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run {run + 1} {name}: {results[name][-1]['seconds']:.1f} s", file=sys.stderr)
    print(report(folder, size, args, results, (load_before, os.getloadavg()[0])))


def report(folder: Path, size: int, args, results: dict[str, list[dict]], load: tuple[float, float]) -> str:
    import torch

    lines = [f"bench_load  {datetime.date.today()}  {' '.join(sys.argv)}",
             f"machine: {_cpu_name()}, {os.cpu_count()} cores, {_total_gb():.0f} GB RAM; python {platform.python_version()}, "
             f"torch {torch.__version__}, transformers {_version('transformers')}; "
             f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end",
             f"checkpoint: {folder} ({size / 1e9:.2f} GB in *.safetensors), loaded as {args.dtype}, {args.runs} runs each, "
             "alternating", "",
             "| loader | median s | min s | max s | GB/s (checkpoint / median) | weights GB | peak RSS GB | peak RSS / weights |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        median = statistics.median(seconds)
        weights, peak = runs[0]["weight_bytes"], max(r["peak_rss"] for r in runs)
        lines.append(f"| {name} | {median:.1f} | {min(seconds):.1f} | {max(seconds):.1f} | {size / median / 1e9:.2f} | "
                     f"{weights / 1e9:.2f} | {peak / 1e9:.2f} | {peak / weights:.2f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _total_gb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemTotal"].split()[0]) * 1024 / 1e9


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
