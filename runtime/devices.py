"""Device kinds `moerun plan --devices KIND:COUNT` knows, by the memory each one reports (nvidia-smi / npu-smi,
in MiB), and custom sizes: `96g:4` is four devices of 96 GB (10^9 bytes, as spec sheets and MiniMax's deployment
figures count), `96gi:4` four of 96 GiB."""

from __future__ import annotations

import dataclasses
import re

from moerun.backends.errors import ConfigError

MiB = 1 << 20
KINDS = {
    "h100-80g": 81559 * MiB,  # H100 SXM 80 GB
    "h200-141g": 143771 * MiB,  # H200 141 GB
    "910b-64g": 65536 * MiB,  # Atlas 800I A2: one 910B NPU
    "910c-64g-die": 65536 * MiB,  # Atlas 800 A3: one die of a 910C (each package is two dies, two ranks)
}
_CUSTOM = re.compile(r"^(\d+(?:\.\d+)?)(g|gb|gi|gib)$")


@dataclasses.dataclass(frozen=True)
class Devices:
    kind: str
    memory: int  # bytes per device
    count: int

    def describe(self) -> str:
        return f"{self.count} x {self.kind} ({self.memory / 2**30:.1f} GiB = {self.memory / 1e9:.1f} GB each)"


def parse_devices(text: str) -> Devices:
    kind, sep, count_text = text.strip().lower().rpartition(":")
    allowed = f"KIND:COUNT with KIND one of {', '.join(KINDS)} or a size like 96g (GB) or 96gi (GiB)"
    if not sep or not count_text.isdigit() or int(count_text) < 1:
        raise ConfigError(f"--devices: {text!r} is not {allowed}")
    if kind in KINDS:
        return Devices(kind, KINDS[kind], int(count_text))
    m = _CUSTOM.match(kind)
    if not m:
        raise ConfigError(f"--devices: unknown device kind {kind!r} (allowed: {allowed})")
    unit = 2**30 if m.group(2).startswith("gi") else 10**9
    return Devices(kind, int(float(m.group(1)) * unit), int(count_text))
