"""W8A8 checkpoints for tests: transformers-saved checkpoints through `moerun quantize --w8a8`, and an independent
numpy quantization to check them against."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def numpy_quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-output-channel symmetric int8 in numpy: scale = max|w| / 127 per row in float32 (1 for an
    all-zero row), q = w / scale in float32 (IEEE division, as torch's), rounded half to even: (q int8, scale [out])."""
    w = weight.astype(np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    return np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8), scale


def quantize(src: Path, dst: Path, max_shard_size: str = "4GB") -> Path:
    from moerun.runtime.cli import main

    assert main(["quantize", "--w8a8", str(src), str(dst), "--max-shard-size", max_shard_size]) == 0
    return dst
