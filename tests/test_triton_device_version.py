"""The CUDA kernels against the GPU image's Triton (3.6) as well as the pinned one (the `test` extra's 3.9): the
kernel-level interpreted tests (tests/test_cuda_kernels_interpreted.py, all but the whole-backend ones, which
exercise the same kernels through the engine) and the sm_90 ahead-of-time compile of every kernel at MiniMax-M2's
shapes (tests/test_cuda_compile.py; the GPU is an H200), each in a subprocess whose Triton is 3.6.

Triton 3.6 is installed once with `pip install --no-deps --target` into a cache folder (reused while present) and
put first on PYTHONPATH, so torch, numpy, transformers and moerun stay this environment's. A venv with
--system-site-packages would not do: created from inside a venv it sees the base interpreter's packages, not
this one's. Cost, measured on a 2-core machine like CI's: provisioning (cold only) downloads a 188 MB wheel and
unpacks 640 MB (about 10 s here from the package index); each run then takes about 25 s of interpreted kernels
and 6 to 17 s of compiles (warm or cold Triton cache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

DEVICE_IMAGE_TRITON = "3.6.0"
ROOT = Path(__file__).resolve().parents[1]


def _overlay() -> Path:
    """A folder holding Triton DEVICE_IMAGE_TRITON only, installed on first use. Written to a temporary sibling and
    renamed into place, so a failed or concurrent install never leaves a half-written overlay behind."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moerun"
    target = cache / f"triton-{DEVICE_IMAGE_TRITON}-{sys.implementation.cache_tag}"
    if (target / "triton" / "__init__.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache))
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                               "--target", str(staging), f"triton=={DEVICE_IMAGE_TRITON}"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"could not install triton=={DEVICE_IMAGE_TRITON}:\n{proc.stdout}\n{proc.stderr}"
        try:
            staging.rename(target)
        except OSError:  # another run installed it meanwhile
            assert (target / "triton" / "__init__.py").is_file()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def triton_36_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_overlay()), *filter(None, [env.get("PYTHONPATH")])])
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == DEVICE_IMAGE_TRITON, version.stderr
    return env


def _pytest(env: dict[str, str], *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"with triton {DEVICE_IMAGE_TRITON}:\n{proc.stdout[-20000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-3000:]


def test_interpreted_kernels_with_device_image_triton(triton_36_env):
    _pytest({**triton_36_env, "TRITON_INTERPRET": "1"}, "-m", "not whole_backend",
            "tests/test_cuda_kernels_interpreted.py")


def test_compiles_for_sm90_with_device_image_triton(triton_36_env):
    _pytest(triton_36_env, "-k", "compile_for_h100", "tests/test_cuda_compile.py")
