"""Lazy, strict access to the tensors of an HF safetensors checkpoint folder.

Only headers are read up front. Tensors are read on demand with plain reads into memory the caller owns (often
the final weight itself), never mapped from the file: pages of a mapped file count toward the process's resident
memory once touched, so a mapping would keep a loaded checkpoint's source bytes resident beside the weights made
from them. Every problem names the tensor and the file.

A checkpoint is downloaded data, so its files are checked before safetensors opens them: every shard the index
names must stay inside the folder (no absolute paths, no `..`, no symlink leading out, except into a Hugging Face
hub cache's blobs/), must be a regular file (a FIFO would block the open forever), and must declare a header that
fits in the file and in MAX_HEADER_BYTES. safetensors itself then checks the header's JSON, dtypes, shapes and
offsets (overlaps, gaps, out of range) and refuses the file with one message.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path, PurePath

import torch
from safetensors import safe_open

from moerun.backends.errors import CheckpointError, key_name, shown
from moerun.runtime.files import MiB, file_kind, is_dir, read_json_object
from moerun.runtime.shard_writer import SAFETENSORS_DTYPES
from moerun.runtime.w8a8_format import INDEX_FILE as W8A8_INDEX_FILE, Description, is_w8a8_folder, read_description

INDEX_FILE = "model.safetensors.index.json"
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}  # safetensors dtype -> torch dtype
INDEX_FILES = (INDEX_FILE, W8A8_INDEX_FILE)  # msModelSlim's W8A8 exports name their index after their shards
MAX_INDEX_BYTES = 64 * MiB  # the full M2 release's index is ~10 MB (96k tensors)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit per file
MAX_TOTAL_HEADER_BYTES = 1 << 30  # all shards' headers are parsed and kept while loading


def shard_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, str | None]:
    """The safetensors files of a checkpoint folder, the index's tensor -> file map and the index's name when it has
    an index (the index names the files; without one, every *.safetensors file in the folder). Each file is checked
    as the module doc says before anything opens it."""
    indexes = [folder / name for name in INDEX_FILES if os.path.lexists(folder / name)]
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: holds both {indexes[0].name} and {indexes[1].name}; keep one index")
    weight_map: dict[str, str] | None = None
    index_name = None
    if indexes:
        index = indexes[0]
        index_name = index.name
        weight_map = read_json_object(index, MAX_INDEX_BYTES, "safetensors index").get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must map each tensor "
                                  f"name to a shard file name, got {shown(weight_map)})")
        files = sorted({_shard_path(folder, name, f"listed in {index.name}") for name in weight_map.values()})
        for f in files:
            if not os.path.lexists(f):
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
    else:
        files = sorted(_shard_path(folder, p.name, "found") for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
    header_bytes = 0
    for path in files:
        header_bytes += _declared_header_size(path)
        if header_bytes > MAX_TOTAL_HEADER_BYTES:
            raise CheckpointError(f"{folder}: the shards' safetensors headers add up to more than "
                                  f"{MAX_TOTAL_HEADER_BYTES >> 20} MiB")
    return files, weight_map, index_name


def _shard_path(folder: Path, name: str, how: str) -> Path:
    """The path of a shard file name from the index (or the folder), refused when it leads out of the folder."""
    parts = PurePath(name).parts
    if not name or "\0" in name or os.path.isabs(name) or ".." in parts:
        raise CheckpointError(f"{folder}: shard {shown(name)} {how} is not a file name inside the checkpoint "
                              f"folder (allowed: a relative name without '..')")
    path = folder / name
    try:
        real, inside = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise CheckpointError(f"{path}: a symlink loop") from None
    # huggingface_hub snapshots are symlinks into the repository's blobs/ folder: <repo>/snapshots/<rev>/x.
    blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else None
    if os.path.lexists(path) and not (real.is_relative_to(inside) or (blobs and real.is_relative_to(blobs))):
        raise CheckpointError(f"{path}: a symlink to {shown(str(real))}, outside the checkpoint folder "
                              f"(allowed: links within it, or into a Hugging Face cache's blobs/)")
    return path


def tensor_locations(names_by_file: Iterable[tuple[Path, Iterable[str]]], weight_map: dict[str, str] | None,
                     index_name: str | None = None) -> dict[str, Path]:
    """tensor name -> the file that holds it: each tensor in exactly one file, and in the one the index names."""
    file_of: dict[str, Path] = {}
    for path, names in names_by_file:
        for name in names:
            if name in file_of:
                raise CheckpointError(f"{key_name(name)}: stored twice, in {file_of[name].name} and {path.name}")
            file_of[name] = path
    for name, file in (weight_map or {}).items():
        actual = file_of.get(name)
        if actual is None or actual.name != file:
            where = f"it is in {actual.name}" if actual else "it is in no file"
            raise CheckpointError(f"{key_name(name)}: {index_name} says {shown(file)}, but {where}")
    return file_of


class Checkpoint:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not is_dir(self.folder):
            raise CheckpointError(f"{self.folder}: checkpoint folder not found")
        self._files, self.weight_map, self.index_name = shard_files(self.folder)
        self._handles: dict[Path, object] = {}
        self._extents: dict[Path, dict[str, tuple[int, int]]] = {}  # file -> tensor -> (first byte, end byte)
        self.file_of = tensor_locations(((path, self._open(path).keys()) for path in self._files), self.weight_map,
                                        self.index_name)
        # An msModelSlim W8A8 export says which tensors are int8 (w8a8_format); None for a float or FP8 folder.
        self.description: Description | None = read_description(self.folder) if is_w8a8_folder(self.folder) else None

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

    def nbytes(self, name: str) -> int:
        start, end = self._extent(name)
        return end - start

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in fresh memory."""
        out = torch.empty(self.shape(name), dtype=TORCH_DTYPES[self.dtype(name)])
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor, first_row: int = 0) -> None:
        """Fill the contiguous host tensor `out` with the stored bytes of `name` from row first_row on, as many as
        `out` holds (a whole tensor, or a band of rows of one read a band at a time)."""
        path = self.file_of[name]
        start, end = self._extent(name)
        if first_row:
            start += first_row * ((end - start) // self.shape(name)[0])
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        if start + len(buffer) > end:
            raise ValueError(f"{name}: {len(buffer)} bytes from row {first_row} run past the tensor's end")
        try:
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < len(buffer):  # a read may return less than asked (at most ~2 GB per call on Linux)
                    n = os.preadv(f.fileno(), [buffer[done:]], start + done)
                    if n == 0:
                        raise CheckpointError(f"{name}: cannot be read from {path.name} (the file ends early)")
                    done += n
        except OSError as e:
            raise CheckpointError(f"{name}: cannot be read from {path.name} ({e.strerror or e})") from None

    def _extent(self, name: str) -> tuple[int, int]:
        path = self.file_of[name]
        if path not in self._extents:  # the header safe_open has already checked, read again for the offsets
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            base = 8 + size
            self._extents[path] = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
                                   for k, v in header.items() if k != "__metadata__"}
        return self._extents[path][name]


def _declared_header_size(path: Path) -> int:
    """The header length a shard declares, after checking it is a regular file that can hold that header;
    safetensors would read a FIFO forever and trusts the declared length up to 100 MB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is {file_kind(st.st_mode)}; a safetensors shard must be a regular file")
    with os.fdopen(fd, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({st.st_size} bytes, shorter than the 8-byte header length)")
    size = int.from_bytes(prefix, "little")
    if size > min(MAX_HEADER_BYTES, st.st_size - 8):
        raise CheckpointError(f"{path}: not a safetensors file (it declares a {size}-byte header; the file has "
                              f"{st.st_size - 8} bytes after the length and the most allowed is {MAX_HEADER_BYTES})")
    return size


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
