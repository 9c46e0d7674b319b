"""`moerun parity` of a `moerun quantize --w8a8` output on the emulated Ascend backend against the bf16 checkpoint it
came from on the CPU backend: the report is produced, its W8A8-vs-bf16 column is what numpy computes from the two
runs' logits, and its figures against the high-precision run are where int8 quantization puts them (the verdict
is reported as it falls: on a toy model without QuaRot, W8A8 leaves the bf16 noise floor; docs/fidelity.md)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import run_yaml

from moerun.runtime.cli import main
from moerun.runtime.engine import Engine

SEQUENCES = [[1, 17, 42, 5, 99, 3, 150, 7, 7, 7, 200, 64, 11, 0, 123, 45, 46, 47, 8, 2, 190, 33, 12],
             [5, 6, 7, 8, 9, 10, 100, 101, 102, 103, 104, 105, 180, 181, 182, 183, 20, 21, 22, 23, 24, 25]]


def numpy_figures(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """KL(P_a || P_b) per position, top-1 agreement and max |a - b| / max |a|, in float64, written out."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    log_pa = a - a.max(-1, keepdims=True) - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_pb = b - b.max(-1, keepdims=True) - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = (np.exp(log_pa) * (log_pa - log_pb)).sum(-1)
    return {"mean KL(y||x)": kl.mean(), "median KL(y||x)": np.median(kl), "max KL(y||x)": kl.max(),
            "top-1 agreement": (a.argmax(-1) == b.argmax(-1)).mean(),
            "max |x-y| / max|y|": np.abs(a - b).max() / np.abs(a).max()}


def table(out: str) -> dict[str, list[str]]:
    """metric -> its cells (floor, candidate, [limit], B vs A) from the calibrated verdict's table."""
    rows = {}
    for line in out.splitlines():
        for metric in ("positions", "max |x-y| / max|y|", "median KL(y||x)", "mean KL(y||x)", "max KL(y||x)",
                       "top-1 agreement", "top-5 overlap"):
            if line.startswith(metric):
                rows[metric] = line[len(metric):].split()
    return rows


def test_w8a8_against_bf16_parity_is_reported(w8a8_checkpoint, write_yaml, capsys):
    w8a8, bf16 = w8a8_checkpoint("m2_like", torch.bfloat16, seed=3)
    reference = write_yaml(run_yaml(bf16, dtype="bfloat16"), "bf16_cpu.yaml")
    candidate = write_yaml(run_yaml(w8a8, backend="ascend", dtype="bfloat16", block_size=128,
                                    ascend={"emulate": True}), "w8a8_ascend.yaml")
    capsys.readouterr()
    code = main(["parity", "-c", str(reference), "-c", str(candidate),
                 *[arg for s in SEQUENCES for arg in ("--token-ids", ",".join(map(str, s)))]])
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert (code, verdict.split(":")[0]) in ((0, "PASS"), (1, "FAIL")), out
    rows = table(out)
    assert rows["positions"] == [str(sum(map(len, SEQUENCES)))] * 3

    # B vs A, the last column, against numpy on the two runs' logits.
    logits = [torch.cat([Engine.from_config(c).logits(s) for s in SEQUENCES]).numpy() for c in (reference, candidate)]
    for metric, value in numpy_figures(*logits).items():
        assert np.isclose(float(rows[metric][-1]), value, rtol=1e-3, atol=5e-5), (metric, rows[metric], value)

    # Against HP: int8 weights and activations move every position, far more than bf16 rounding does, and stay
    # where 8-bit quantization of a hidden-64 model puts them.
    floor, w8a8_kl, kl_limit = (float(rows["median KL(y||x)"][i]) for i in (0, 1, 3))
    top1, top1_limit = (float(rows["top-1 agreement"][i]) for i in (1, 3))
    assert 3 * floor < w8a8_kl < 2e-2 and top1 >= 0.8, out
    assert verdict.startswith("PASS") == (w8a8_kl <= kl_limit and top1 >= top1_limit), out
