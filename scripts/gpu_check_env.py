"""scripts/gpu_check.sh's first step: the versions and the device this check runs on, printed and written as JSON
(OUT_JSON); exit 1 when the check expects a GPU (not --dry-run) and torch sees none, or moerun is not this tree's."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # noqa: BLE001 - a missing or broken package is what this step reports
        return f"unavailable ({type(exc).__name__}: {exc})"


def main() -> int:
    out, dry_run = Path(sys.argv[1]), "--dry-run" in sys.argv[2:]
    import moerun.runtime

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": version("triton"), "transformers": version("transformers"), "numpy": version("numpy"),
            "moerun_from": str(Path(moerun.runtime.__file__).resolve().parent.parent), "cpu_count": os.cpu_count(),
            "dry_run": dry_run, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"sm{props.major}{props.minor}", "sms": props.multi_processor_count,
                       "memory_gib": round(props.total_memory / 2 ** 30, 1), "count": torch.cuda.device_count()}
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    problems = []
    if info["moerun_from"] != str(ROOT):
        problems.append(f"moerun imports from {info['moerun_from']}, not this tree {ROOT}")
    if not dry_run and info["gpu"] is None:
        problems.append("torch sees no CUDA GPU")
    for p in problems:
        print(f"gpu_check: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
