"""Which device the CUDA backend runs on, and what that device can do. Imports no Triton: the YAML validation
imports every backend class on machines without a GPU or Triton."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from moerun.backends.errors import MoerunError, UnsupportedModelError, shown


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_device(name: str) -> torch.device:
    """The device the `cuda.device` option names, or one line saying why it cannot be used.

    "cpu" is allowed only under Triton's interpreter (TRITON_INTERPRET=1): the kernels then run on the CPU,
    slowly, which is how CI tests them without a GPU."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MoerunError(f"cuda.device: {shown(name)} is not a device (expected e.g. 'cuda:0')") from None
    if device.type == "cpu":
        if not interpreter_requested():
            raise MoerunError("cuda.device: 'cpu' runs the kernels in Triton's interpreter and needs TRITON_INTERPRET=1 "
                              "(for tests; use backend: cpu to run on the CPU)")
        _require_triton()
        return device
    if device.type != "cuda":
        raise MoerunError(f"cuda.device: {shown(name)} is not a CUDA device (expected e.g. 'cuda:0')")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UnsupportedModelError(f"backend cuda: {why} (torch {torch.__version__}); use backend: cpu or run on a GPU machine")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UnsupportedModelError(f"cuda.device: {shown(name)} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
    if interpreter_requested():
        raise MoerunError("TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter; unset it to use the GPU")
    _require_triton()
    return torch.device("cuda", index)


def _require_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        raise MoerunError("backend cuda needs Triton for its kernels: pip install 'moerun[cuda]' (or: pip install triton)")


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def supports_fp8(device: torch.device) -> bool:
    """FP8 e4m3 tensor-core matmuls: Ada (sm89) and Hopper (sm90) onwards. The interpreter emulates them."""
    cc = compute_capability(device)
    return cc is None or cc >= (8, 9)


def supports_bf16(device: torch.device) -> bool:
    cc = compute_capability(device)
    return cc is None or cc >= (8, 0)


# Shared memory one block may use on an H100 (227 KiB, opt-in); the interpreter plans tiles as for an H100.
H100_SHARED_MEMORY = 232448


@functools.lru_cache(maxsize=None)
def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use (what Triton checks a compiled kernel against at launch):
    227 KiB on Hopper, 163 KiB on A100, 99 KiB on sm86/sm89 (RTX 30xx/40xx, L4, L40S)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return H100_SHARED_MEMORY


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; it only shapes the split heuristics


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cc = compute_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{cc[0]}{cc[1]})"
    return "CPU (Triton interpreter)"
