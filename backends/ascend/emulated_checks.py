"""The errors the torch_npu emulation raises, and the helpers that raise them.

A real torch_npu op that gets arguments outside its documented limits fails inside CANN with a RuntimeError
(or, worse, returns garbage: block ids and duplicate slots are "not validated"). The emulation raises
ConstraintError in both cases, so a backend bug that would corrupt results on an NPU fails loudly on CPU.
Features of an op that moerun does not call (quantization, other layouts, ...) raise NotEmulatedError rather
than being approximated: the emulation never silently computes something different from the hardware.
"""

from __future__ import annotations

import torch


class ConstraintError(RuntimeError):
    """A call outside the op's documented limits (or into its documented undefined behaviour)."""


class NotEmulatedError(NotImplementedError):
    """A documented feature of the op that the emulation does not implement because moerun never uses it."""


def require(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise ConstraintError(f"{op}: {message}")


def not_emulated(op: str, what: str) -> None:
    raise NotEmulatedError(f"{op}: {what} is not emulated (moerun does not call it)")


def reject_given(op: str, **optional: object) -> None:
    """Every optional argument here must be None: each one switches on a feature that is not emulated."""
    given = sorted(name for name, value in optional.items() if value is not None)
    if given:
        not_emulated(op, ", ".join(given))


def require_dtype(t: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str, name: str) -> None:
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    require(t.dtype in allowed, op, f"{name} dtype {str(t.dtype).removeprefix('torch.')} is not supported ({names})")


def require_contiguous(t: torch.Tensor, op: str, name: str) -> None:
    require(t.is_contiguous(), op, f"{name} must be contiguous (non-contiguous tensors are not supported)")


def undefined_like(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Memory the kernel leaves unwritten: NaN (or the integer minimum), so that reading it cannot go unnoticed."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
