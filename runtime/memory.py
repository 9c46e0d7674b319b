"""Memory for weights and the KV cache: how much is free where the backend keeps them, and allocations whose failure
is one line naming what was being allocated, how much, and what to change.

Checked before allocating, because on Linux a large allocation that does not fit usually succeeds and the process
is killed later, when the pages are touched; caught while allocating, for what the check cannot see (a container's
memory limit, other processes, device memory a backend does not report)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from moerun.backends.base import Backend
from moerun.backends.errors import ResourceError

GB = 1e9
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def format_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.1f} MB"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (it counts reclaimable page cache), narrowed by a cgroup v2 memory limit
    when the process runs under one (containers, CI runners); None where neither can be read. Swap is not
    counted: weights paged out to swap would make every step crawl."""
    available = _meminfo("MemAvailable")
    if available is None:
        return None
    cgroup = _cgroup_memory()
    if cgroup is not None:
        limit, used, reclaimable = cgroup
        available = min(available, max(limit - used + reclaimable, 0))
    return available


def host_memory_total() -> int | None:
    """MemTotal, narrowed by a cgroup v2 memory limit: the host memory `moerun plan` sizes a CPU run by."""
    total = _meminfo("MemTotal")
    cgroup = _cgroup_memory()
    return total if total is None or cgroup is None else min(total, cgroup[0])


def _meminfo(key: str) -> int | None:
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text(encoding="ascii").splitlines() if ":" in line)
        return int(fields[key].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _cgroup_memory() -> tuple[int, int, int] | None:
    """(limit, used, reclaimable page cache) of this process's cgroup v2 memory limit; None without one."""
    try:
        limit = (CGROUP / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        used = int((CGROUP / "memory.current").read_text(encoding="ascii"))
        stat = dict(line.split() for line in (CGROUP / "memory.stat").read_text(encoding="ascii").splitlines()
                    if line.strip())
        return int(limit), used, int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        return None


def memory_free(backend: Backend) -> int | None:
    """Free bytes where the backend keeps weights and cache: its device's, or the host's for a host device."""
    free = backend.device_info().get("memory_free")
    if free is None and backend.device.type == "cpu":
        return host_memory_available()
    return free


def check_fits(what: str, nbytes: int, backend: Backend, advice: str) -> None:
    fits_in(what, nbytes, memory_free(backend), backend.device, advice)


def fits_in(what: str, nbytes: int, free: int | None, device: torch.device, advice: str) -> None:
    """Refuse `what` (nbytes) when it is more than `free` (None: not known, so not refused)."""
    if free is not None and nbytes > free:
        raise ResourceError(f"not enough memory: {what} need {format_bytes(nbytes)} on {device}, "
                            f"{format_bytes(free)} free; {advice}")


def is_out_of_memory(error: BaseException) -> bool:
    """Allocation failures as the allocators report them: Python's MemoryError, torch's OutOfMemoryError (CUDA),
    and the RuntimeErrors of the CPU allocator ("can't allocate memory") and the NPU one ("NPU out of memory")."""
    if isinstance(error, MemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@contextlib.contextmanager
def allocating(what: str, nbytes: int, device: torch.device, advice: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into a ResourceError naming `what` and its size."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise ResourceError(f"out of memory allocating {what} ({format_bytes(nbytes)} on {device}); {advice}") from e


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
