"""The one place where the Ascend backend gets its ops: the real torch_npu module, or the CPU emulation with the
same function names. Everything else in backends/ascend calls `source.ops.npu_*` and cannot tell which it got.

torch_npu is imported here, lazily, and nowhere at module top level: YAML validation imports every backend class
on machines without CANN, where `import torch_npu` fails (and, once installed, breaks `import torch` itself
unless TORCH_DEVICE_BACKEND_AUTOLOAD=0; see docs/ascend.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from types import ModuleType

import torch

from moerun.backends.ascend import emulation
from moerun.backends.errors import ConfigError, MoerunError, shown

DEVICE_PATTERN = re.compile(r"npu(?::(\d{1,4}))?")
DOCS = "docs/ascend.md"

_announced = False  # the emulation notice goes to stderr once per process, not once per engine


@dataclasses.dataclass(frozen=True)
class OpSource:
    ops: ModuleType  # torch_npu, or moerun.backends.ascend.emulation
    device: str  # where the backend's tensors live: "npu:N", or "cpu" under emulation
    label: str  # for describe()
    # The emulation's one widening: fused attention on float32 (the A2/A3 kernel takes fp16/bf16 only).
    float32_attention: bool


def parse_device(device: str, key_path: str = "ascend.device") -> int:
    match = DEVICE_PATTERN.fullmatch(device)
    if not match:
        raise ConfigError(f"{key_path}: expected 'npu' or 'npu:N', got {shown(device)}")
    return int(match.group(1) or 0)


def load(emulate: bool, device: str) -> OpSource:
    index = parse_device(device)  # checked in both modes, so a typo shows up on a CPU machine too
    if emulate:
        _announce_emulation(device)
        return OpSource(ops=emulation, device="cpu", label="emulated on cpu: torch_npu ops in PyTorch",
                        float32_attention=True)
    torch_npu = import_torch_npu()
    visible = torch_npu.npu.device_count()
    if index >= visible:
        raise MoerunError(f"ascend.device {shown(device)}: torch_npu sees {visible} NPU(s); check `npu-smi info` and "
                          f"ASCEND_RT_VISIBLE_DEVICES, or pick npu:0..npu:{max(visible - 1, 0)} (see {DOCS})")
    torch_npu.npu.set_device(index)
    return OpSource(ops=torch_npu, device=f"npu:{index}", label=f"torch_npu {torch_npu.__version__}",
                    float32_attention=False)


def import_torch_npu() -> ModuleType:
    try:
        return importlib.import_module("torch_npu")
    except Exception as e:  # ImportError without the wheel; ImportError/RuntimeError/OSError without CANN libraries
        raise MoerunError(missing_torch_npu_message(e)) from None


def missing_torch_npu_message(error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    torch_version = torch.__version__.split("+")[0]
    return (f"ascend: cannot import torch_npu ({type(error).__name__}: {detail}); the Ascend backend needs "
            f"torch_npu=={torch_version}.* (it must match torch {torch_version}) and the CANN toolkit paired with it "
            f"(CANN 9.1.x for torch_npu 2.10-2.12), sourced via set_env.sh on an Atlas A2/A3 host; "
            f"see {DOCS}, or set ascend.emulate: true to run the Ascend code path on CPU")


def _announce_emulation(device: str) -> None:
    global _announced
    if not _announced:
        _announced = True
        print(f"moerun: ascend.emulate is on: the Ascend code path runs on CPU with torch_npu's ops emulated in "
              f"PyTorch (ascend.device {device!r} is not used); results say nothing about NPU speed", file=sys.stderr)
