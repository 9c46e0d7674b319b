"""Checkpoint fingerprints: the sha256 of every tensor's stored bytes and of the files that decide what the model says
(config, generation defaults, tokenizer, chat template), and one digest over all of them.

Tensors are hashed by name from the bytes the safetensors header points at, so the fingerprint does not depend on
how the checkpoint is cut into shards or on the headers' metadata. Every read is a bounded chunk into one buffer
per worker thread (never a whole file or tensor in memory, nothing memory-mapped), shards in parallel: hashing a
230 GB release is I/O-bound and needs a few MB.

The digest (docs/fidelity.md): sha256 over UTF-8 lines, each a compact JSON array, in this order:
    ["moerun-fingerprint/1"]
    ["file", name, sha256]                      for each hashed file, by name
    ["chat_template", sha256 or null]           the template text, wherever it was found
    ["tensor", name, dtype, shape, sha256]      for each tensor, by name
(names sorted by code point; JSON with separators "," and ":" and ASCII escapes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.checkpoint import shard_files, tensor_locations
from moerun.runtime.tokenizer import read_chat_template

FORMAT = "moerun-fingerprint/1"
# Files that change what a deployment computes or how it frames a prompt, hashed when present.
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
         "quant_model_description.json")  # the last: which tensors an msModelSlim W8A8 export quantized
CHUNK = 4 << 20  # bytes per read: large enough for full disk speed, small enough to hold one per thread
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST = 1 << 30  # a manifest of the 230B release with probes is ~30 MB


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype name: BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    sha256: str  # of the stored bytes

    @property
    def nbytes(self) -> int:
        """Stored size (0 for a dtype this module does not know)."""
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 0)


@dataclasses.dataclass
class Fingerprint:
    tensors: dict[str, TensorEntry]
    files: dict[str, str]  # file name -> sha256 of its bytes
    chat_template: str | None  # sha256 of the template text
    chat_template_source: str | None  # "chat_template.jinja" or "tokenizer_config.json (chat_template)"

    @property
    def digest(self) -> str:
        h = hashlib.sha256()

        def line(*fields) -> None:
            h.update((json.dumps(list(fields), separators=(",", ":"), ensure_ascii=True) + "\n").encode())

        line(FORMAT)
        for name in sorted(self.files):
            line("file", name, self.files[name])
        line("chat_template", self.chat_template)
        for name in sorted(self.tensors):
            t = self.tensors[name]
            line("tensor", name, t.dtype, list(t.shape), t.sha256)
        return "sha256:" + h.hexdigest()

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "digest": self.digest,
            "files": dict(sorted(self.files.items())),
            "chat_template": None if self.chat_template is None else {"source": self.chat_template_source,
                                                                       "sha256": self.chat_template},
            "tensors": {name: {"dtype": t.dtype, "shape": list(t.shape), "sha256": t.sha256}
                        for name, t in sorted(self.tensors.items())},
        }

    @classmethod
    def from_json(cls, data: object, source: str) -> Fingerprint:
        """A manifest's fingerprint, checked entry by entry and against its own digest (MoerunError naming what)."""
        def bad(what: str) -> MoerunError:
            return MoerunError(f"{source}: not a moerun fingerprint manifest ({what})")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"expected a JSON object with format {FORMAT!r}")
        files, tensors, template = data.get("files"), data.get("tensors"), data.get("chat_template")
        if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.match(v) for v in files.values()):
            raise bad("'files' must map names to sha256 hex digests")
        if not isinstance(tensors, dict):
            raise bad("'tensors' must be an object")
        entries = {}
        for name, t in tensors.items():
            ok = (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
                  and isinstance(t.get("sha256"), str) and _SHA256.match(t["sha256"]))
            if not ok:
                raise bad(f"tensor {name!r}: expected dtype, shape and sha256")
            entries[name] = TensorEntry(t["dtype"], tuple(t["shape"]), t["sha256"])
        if template is not None and not (isinstance(template, dict) and isinstance(template.get("sha256"), str)
                                         and _SHA256.match(template["sha256"])):
            raise bad("'chat_template' must be null or have a sha256")
        fp = cls(entries, dict(files), template and template["sha256"], template and template.get("source"))
        if data.get("digest") != fp.digest:
            raise MoerunError(f"{source}: the manifest's digest does not match its entries (edited or damaged)")
        return fp


@dataclasses.dataclass(frozen=True)
class _Span:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


def read_header(path: Path) -> list[_Span]:
    """The tensors of one safetensors file and where their bytes are, from its header alone (checked against the
    file's size, so a damaged file is an error here rather than a short read later)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size)
        except (KeyError, TypeError, ValueError):
            valid = False
        if valid and dtype in _ITEMSIZE:
            valid = end - begin == math.prod(shape) * _ITEMSIZE[dtype]
        if not valid:
            raise CheckpointError(f"{name}: its safetensors header entry in {path.name} is invalid or points "
                                  f"outside the file")
        spans.append(_Span(name, dtype, shape, data_start + begin, data_start + end))
    return spans


def _hash_range(f, begin: int, end: int, buffer: memoryview, counted: list[int], slot: int,
                stop: threading.Event, where: str) -> str:
    h = hashlib.sha256()
    f.seek(begin)
    remaining = end - begin
    while remaining:
        if stop.is_set():
            raise concurrent.futures.CancelledError
        n = f.readinto(buffer[:min(len(buffer), remaining)])
        if not n:
            raise CheckpointError(f"{where}: the file ended early (truncated while being read?)")
        h.update(buffer[:n])
        remaining -= n
        counted[slot] += n
    return h.hexdigest()


def _hash_shard(path: Path, spans: list[_Span], counted: list[int], slot: int,
                stop: threading.Event) -> dict[str, str]:
    buffer = memoryview(bytearray(CHUNK))
    out = {}
    with open(path, "rb", buffering=0) as f:
        for span in sorted(spans, key=lambda s: s.begin):  # in file order: one sequential read
            out[span.name] = _hash_range(f, span.begin, span.end, buffer, counted, slot, stop, f"{path.name}: {span.name}")
    return out


def hash_file(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    with open(path, "rb", buffering=0) as f:
        return _hash_range(f, 0, path.stat().st_size, memoryview(bytearray(CHUNK)), [0], 0, threading.Event(),
                           path.name)


def fingerprint(folder: str | Path, threads: int = 0,
                progress: Callable[[int, int], None] | None = None) -> Fingerprint:
    """Hash a checkpoint folder. threads 0: one per shard up to the CPU count. progress(bytes_done, bytes_total) is
    called from the calling thread a few times a second while the shards are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    files = {}
    for name in FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            files[name] = hash_file(path)
    if "config.json" not in files:
        raise CheckpointError(f"{folder}: no config.json (a Hugging Face checkpoint folder holds config.json and "
                              f"*.safetensors)")
    template, template_source = read_chat_template(folder)
    shards, weight_map, index_name = shard_files(folder)
    spans = {path: read_header(path) for path in shards}
    tensor_locations(((path, [s.name for s in ss]) for path, ss in spans.items()), weight_map, index_name)
    hashes = _hash_shards(spans, threads or min(len(shards), os.cpu_count() or 1), progress)
    tensors = {s.name: TensorEntry(s.dtype, s.shape, hashes[s.name]) for ss in spans.values() for s in ss}
    return Fingerprint(tensors, files, template and hashlib.sha256(template.encode()).hexdigest(),
                       template_source and Path(template_source).name)


def _hash_shards(spans: dict[Path, list[_Span]], threads: int,
                 progress: Callable[[int, int], None] | None) -> dict[str, str]:
    total = sum(s.end - s.begin for ss in spans.values() for s in ss)
    counted = [0] * len(spans)  # bytes read, one slot per shard: each written by one worker, summed here
    stop = threading.Event()
    hashes: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fingerprint") as pool:
        pending = {pool.submit(_hash_shard, path, ss, counted, i, stop) for i, (path, ss) in enumerate(spans.items())}
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.25, return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in done:
                    hashes.update(future.result())
                if progress:
                    progress(sum(counted), total)
        except BaseException:
            stop.set()  # workers stop at their next chunk; the pool's exit waits for them
            raise
    return hashes


def read_manifest(path: Path) -> dict:
    """A manifest file's JSON object, read within MAX_MANIFEST (MoerunError naming what is wrong)."""
    if not path.is_file():
        raise MoerunError(f"{path}: manifest not found (or not a regular file)")
    if path.stat().st_size > MAX_MANIFEST:
        raise MoerunError(f"{path}: {path.stat().st_size} bytes is too large for a manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoerunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MoerunError(f"{path}: not a moerun fingerprint manifest (expected a JSON object)")
    return data


def compare(expected: Fingerprint, actual: Fingerprint) -> list[str]:
    """One line per difference: each tensor and file missing, extra or changed (bytes, dtype, shape), and the chat
    template."""
    out = []
    for kind, want, have in (("file", expected.files, actual.files), ("tensor", expected.tensors, actual.tensors)):
        for name in sorted(want.keys() - have.keys()):
            out.append(f"{kind} {name}: missing (in the manifest, not in the checkpoint)")
        for name in sorted(have.keys() - want.keys()):
            out.append(f"{kind} {name}: extra (in the checkpoint, not in the manifest)")
        for name in sorted(want.keys() & have.keys()):
            w, h = want[name], have[name]
            if kind == "file":
                if w != h:
                    out.append(f"file {name}: bytes differ")
                continue
            changes = []
            if w.dtype != h.dtype:
                changes.append(f"dtype {h.dtype} (manifest {w.dtype})")
            if w.shape != h.shape:
                changes.append(f"shape {list(h.shape)} (manifest {list(w.shape)})")
            if w.sha256 != h.sha256:
                changes.append("bytes differ")
            if changes:
                out.append(f"tensor {name}: {', '.join(changes)}")
    if expected.chat_template != actual.chat_template:
        if actual.chat_template is None:
            out.append("chat template: missing (the manifest has one, the checkpoint none)")
        elif expected.chat_template is None:
            out.append(f"chat template: extra (in {actual.chat_template_source}; the manifest has none)")
        else:
            out.append(f"chat template: differs (in {actual.chat_template_source})")
    return out
