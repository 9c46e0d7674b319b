"""What the Triton interpreter cannot check, checked without a GPU: the CUDA backend's launch plans obey the
compiler's rules, and its kernels compile to a cubin for Hopper (sm_90) and Ada (sm_89) at MiniMax-M2's shapes.

- Launch plans (pure Python): tile sizes are powers of two, dot tiles at least the compiler's minimum, and the
  shared memory a plan needs fits the device's per-block limit (227 KiB on H100, 163 KiB on A100, 99 KiB on
  sm86/sm89), which Triton checks at launch: a plan over it is an OutOfResources error on the GPU only.
- Compiles (tests/cuda/triton_aot.py in a subprocess): the backend's own launch code with meta tensors, each
  launch turned into a full compile for the target (Triton ships ptxas); every kernel must compile, and its
  compiled shared memory must fit the target. Skipped where Triton has no NVIDIA backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from moerun.backends.cuda import attention, gemm  # noqa: E402
from moerun.backends.cuda.device import H100_SHARED_MEMORY  # noqa: E402

A100_SHARED_MEMORY, SM89_SHARED_MEMORY = 166912, 101376
LIMITS = [H100_SHARED_MEMORY, A100_SHARED_MEMORY, SM89_SHARED_MEMORY]
ROOT = Path(__file__).parents[1]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("smem", LIMITS)
@pytest.mark.parametrize("act_bytes", [2, 4])
@pytest.mark.parametrize("fp8_block_k", [None, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 8, 40, 64, 300, 65536])
def test_gemm_plans_are_legal_and_fit_shared_memory(rows, fp8_block_k, act_bytes, smem):
    cfg = gemm.pick_config(rows, fp8_block_k, False, act_bytes, smem)
    assert all(map(_pow2, (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps)))
    # tl.dot's minimum K: 16 for 16-bit operands, 8 for fp32; fp8 below 32 is multiplied as fp16 (triton_utils.mma)
    assert cfg.block_k >= 16 and cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_stages >= 1
    w_bytes = 1 if fp8_block_k else act_bytes
    assert gemm.smem_estimate(cfg, act_bytes, w_bytes, gated=True) <= smem


def test_m2_gemm_plans_on_h100_are_unchanged():
    """The fitting only ever shrinks plans that do not fit: M2's (bf16, FP8 [128, 128]) keep their tiles."""
    fp8 = lambda rows: gemm.pick_config(rows, 128, False, 2, H100_SHARED_MEMORY)  # noqa: E731
    assert fp8(8) == gemm.GemmConfig(16, 64, 128, 4, 4)
    assert fp8(40) == gemm.GemmConfig(32, 64, 128, 4, 4)
    assert fp8(256) == gemm.GemmConfig(64, 128, 128, 4, 3)
    assert gemm.pick_config(256, None, False, 2, H100_SHARED_MEMORY) == gemm.GemmConfig(64, 128, 64, 8, 3)


@pytest.mark.parametrize("smem", LIMITS)
@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("head_dim", [12, 64, 128, 256])
@pytest.mark.parametrize("longest", [1, 100, 4096])
def test_prefill_tiles_are_legal_and_fit_shared_memory(longest, head_dim, elem_bytes, smem):
    block_m, block_n = attention.prefill_tiles(longest, head_dim, elem_bytes, smem)
    assert _pow2(block_m) and _pow2(block_n) and block_m >= 16 and block_n >= 16
    assert attention.tile_smem(block_m, block_n, head_dim, elem_bytes, attention.PREFILL_STAGES) <= smem
    if elem_bytes == 2 and head_dim == 128:  # M2: unchanged on every GPU
        assert (block_m, block_n) == (128 if longest >= 128 else 64, 64)


def _nvidia_compiler_available() -> str | None:
    try:
        from triton.backends import backends

        if "nvidia" not in backends:
            return "this Triton has no NVIDIA backend"
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path  # noqa: B018  (raises where ptxas is missing)
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        return f"Triton's NVIDIA compiler is unusable here: {exc}"
    return None


def _compile(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda" / "triton_aot.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in records if "error" in r]
    assert proc.returncode == 0 and not errors, f"{errors}\n{proc.stderr[-5000:]}"
    return records


@pytest.mark.skipif(_nvidia_compiler_available() is not None, reason=str(_nvidia_compiler_available()))
def test_kernels_compile_for_h100():
    records = _compile("--arch", "90", "--smem", str(H100_SHARED_MEMORY), "--full")
    compiled = {r["case"] for r in records}
    assert {"decode_b1_200k", "prefill_long", "experts_fp8_prefill", "experts_fp8_decode", "dense_fp8_block16",
            "experts_fp8_block256_prefill", "align", "route"} <= compiled
    assert {r["kernel"] for r in records} >= {"_decode_kernel", "_decode_merge_kernel", "_prefill_kernel", "_gemm_kernel",
                                              "_rms_norm_kernel", "_rotary_kernel", "_write_kv_kernel", "_route_kernel",
                                              "_align_kernel", "_combine_kernel", "_silu_mul_kernel"}
    for r in records:
        assert r["shared"] <= H100_SHARED_MEMORY, r


@pytest.mark.skipif(_nvidia_compiler_available() is not None, reason=str(_nvidia_compiler_available()))
def test_large_tiles_compile_within_99k_for_sm89():
    """Ada (L40S, RTX 40xx) runs FP8 too, with 99 KiB of shared memory per block: the prefill-sized plans shrink."""
    records = _compile("--arch", "89", "--smem", str(SM89_SHARED_MEMORY), "--full", "--only",
                       "prefill_long,experts_fp8_prefill,experts_bf16_prefill,dense_fp8_prefill,experts_fp8_block256_prefill")
    assert len({r["case"] for r in records}) == 5
    for r in records:
        assert r["shared"] <= SM89_SHARED_MEMORY, r
