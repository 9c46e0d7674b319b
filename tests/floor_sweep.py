"""The calibrated verdict over many small transformers-saved checkpoints: for each shape and seed, the noise floor
(cpu bf16 against its float32 high-precision run) and the figures of a faithful candidate (emulated Ascend, bf16)
and of 8-bit and 4-bit fake-quantized copies (group 128, symmetric). The table in docs/fidelity.md comes from here.

    python tests/floor_sweep.py [--seeds 5] [--sequences 2] [--length 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import degrade  # noqa: E402
import hf_checkpoints  # noqa: E402

from moerun.runtime.commands.parity import high_precision_run  # noqa: E402
from moerun.runtime.engine import Engine  # noqa: E402
from moerun.runtime.parity import calibrated_verdict  # noqa: E402
from moerun.runtime.run_config import parse_run_config  # noqa: E402


def logits(folder: Path, backend: str, sequences: list[list[int]], hp: bool = False) -> torch.Tensor:
    raw = {"backend": backend, "model": {"path": str(folder), "dtype": "bfloat16"},
           "kv_cache": {"num_blocks": 64, "block_size": 16 if backend == "cpu" else 128}}
    if backend == "ascend":
        raw["ascend"] = {"emulate": True}
    run = parse_run_config(raw, folder)
    with contextlib.redirect_stderr(io.StringIO()):  # the emulation notice
        engine = Engine(high_precision_run(run, "auto") if hp else run)
    return torch.cat([engine.logits(s) for s in sequences])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="floor_sweep_"))
    print("shape seed | candidate: verdict, median KL / floor's, mean KL / floor's, top-1 floor/candidate")
    for shape in ("gqa4_half_rope", "mha_full_rope", "gqa6_quarter_rope", "m2_like"):
        for seed in range(args.seeds):
            folder = root / f"{shape}_{seed}"
            with contextlib.redirect_stderr(io.StringIO()):
                hf_checkpoints.save_hf_checkpoint(hf_checkpoints.build_hf_model(hf_checkpoints.SHAPES[shape], seed),
                                                  folder, torch.bfloat16)
            for bits in (4, 8):
                degrade.write_fake_quantized(folder, root / f"{shape}_{seed}_q{bits}", bits)
            rng = random.Random(seed)
            sequences = [[rng.randrange(3, 211) for _ in range(args.length)] for _ in range(args.sequences)]
            hp, ref = logits(folder, "cpu", sequences, hp=True), logits(folder, "cpu", sequences)
            row = [f"{shape} {seed}"]
            for name, path, backend in (("ascend", folder, "ascend"), ("q8", root / f"{shape}_{seed}_q8", "cpu"),
                                        ("q4", root / f"{shape}_{seed}_q4", "cpu")):
                v = calibrated_verdict(hp, ref, logits(path, backend, sequences))
                row.append(f"{name} {'PASS' if v.passed else 'FAIL'} x{v.candidate.median_kl / v.floor.median_kl:.2f} "
                           f"mean x{v.candidate.mean_kl / v.floor.mean_kl:.2f} "
                           f"top-1 {v.floor.top1_agreement:.3f}/{v.candidate.top1_agreement:.3f}")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
