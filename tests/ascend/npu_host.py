"""Whether this host can run the real-NPU tests: torch_npu imports (CANN sourced) and an NPU is visible.

These tests are skipped, with the reason, everywhere else; CI has no NPU and must not install torch_npu
(without CANN it breaks `import torch`). The Ascend code path itself runs in CI under emulation
(tests/test_ascend_*.py)."""

from __future__ import annotations

import pytest

NPU = "npu:0"  # the first visible NPU (ASCEND_RT_VISIBLE_DEVICES picks which physical card that is)


def npu_skip_reason() -> str | None:
    try:
        import torch_npu
    except Exception as e:  # absent; or present without the CANN libraries
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch_npu is not importable here ({type(e).__name__}: {first_line})"
    if torch_npu.npu.device_count() == 0:
        return "torch_npu imports but no NPU is visible (check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)"
    return None


_reason = npu_skip_reason()
requires_npu = pytest.mark.skipif(_reason is not None, reason=_reason or "")
