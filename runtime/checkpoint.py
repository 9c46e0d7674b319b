"""Lazy, strict access to the tensors of an HF safetensors checkpoint folder.

Only headers are read up front; tensors are read one at a time from the memory-mapped files, so a 230 GB
checkpoint is never held in memory twice. Every problem names the tensor and the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from moerun.backends.errors import CheckpointError
from moerun.runtime.w8a8_format import INDEX_FILE as W8A8_INDEX_FILE

INDEX_FILE = "model.safetensors.index.json"
INDEX_FILES = (INDEX_FILE, W8A8_INDEX_FILE)  # msModelSlim's W8A8 exports name their index after their shards


def shard_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, str | None]:
    """The safetensors files of a checkpoint folder, the index's tensor -> file map and the index's name when it has
    an index (the index names the files; without one, every *.safetensors file in the folder)."""
    indexes = [folder / name for name in INDEX_FILES if (folder / name).is_file()]
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: holds both {indexes[0].name} and {indexes[1].name}; keep one index")
    if indexes:
        index = indexes[0]
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files, weight_map, index.name
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return files, None, None


def tensor_locations(names_by_file: Iterable[tuple[Path, Iterable[str]]], weight_map: dict[str, str] | None,
                     index_name: str | None = None) -> dict[str, Path]:
    """tensor name -> the file that holds it: each tensor in exactly one file, and in the one the index names."""
    file_of: dict[str, Path] = {}
    for path, names in names_by_file:
        for name in names:
            if name in file_of:
                raise CheckpointError(f"{name}: stored twice, in {file_of[name].name} and {path.name}")
            file_of[name] = path
    for name, file in (weight_map or {}).items():
        actual = file_of.get(name)
        if actual is None or actual.name != file:
            where = f"it is in {actual.name}" if actual else "it is in no file"
            raise CheckpointError(f"{name}: {index_name} says {file}, but {where}")
    return file_of


class Checkpoint:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder not found")
        self._files, self.weight_map, self.index_name = shard_files(self.folder)
        self._handles: dict[Path, object] = {}
        self.file_of = tensor_locations(((path, self._open(path).keys()) for path in self._files), self.weight_map,
                                        self.index_name)

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise CheckpointError(f"{path}: not a readable safetensors file ({_short(e)})") from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._open(self.file_of[name]).get_slice(name).get_dtype()

    def read(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read from {path.name} ({_short(e)})") from None


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
