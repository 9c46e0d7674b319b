"""Sharded safetensors written one tensor at a time, so a converter never holds more than the tensor in hand.

The safetensors layout (an 8-byte little-endian header length, a JSON header of name -> dtype, shape and byte
offsets, then the raw little-endian bytes) puts every tensor's offsets first, so the shards are planned from
names, shapes and dtypes alone; the tensors then arrive in plan order and go straight to disk. The files read back
with the safetensors library, and an index maps each name to its shard, as `save_pretrained` and msModelSlim write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                      torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
                      torch.float8_e4m3fn: "F8_E4M3"}
HEADER_ALIGN = 8  # the safetensors library pads its JSON header to 8 bytes, so tensors start aligned


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors into shards of at most max_bytes each (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


class ShardWriter:
    """Writes planned shards <prefix>-0000i-of-0000n.safetensors into folder; finish() writes the index."""

    def __init__(self, folder: Path, prefix: str, shards: list[list[PlannedTensor]]) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian bytes; this writer copies native ones")
        self.folder, self.prefix, self.shards = Path(folder), prefix, shards
        self._queue = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def file_name(self, shard: int) -> str:
        return f"{self.prefix}-{shard + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next planned tensor, by name, of its planned shape and dtype."""
        shard, planned = self._queue[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (planned.name, planned.shape, planned.dtype):
            raise RuntimeError(f"{name} {tuple(tensor.shape)} {tensor.dtype} arrived where {planned} was planned")
        if shard != self._shard:
            self._open(shard)
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._close()

    def finish(self, index_name: str) -> None:
        """After the last tensor: the index {"metadata": {"total_size"}, "weight_map": {name: file}}."""
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} planned tensors were never written")
        weight_map = {t.name: self.file_name(i) for i, t in self._queue}
        total = sum(t.nbytes for _, t in self._queue)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / index_name).write_text(json.dumps(index, indent=2) + "\n")

    def _open(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGN)
        self._file = open(self.folder / self.file_name(shard), "wb")
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)
        self._shard = shard

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Release an open file after a failure (the folder is discarded by the caller)."""
        self._close()
