"""Reading the small files a user or a checkpoint hands moerun (the YAML config, config.json, the shard index,
tokenizer and template files): only regular files, never more than a stated size, text that must be UTF-8, JSON
that must be an object without repeated keys. Each problem is one error naming the file and what is allowed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moerun.backends.errors import CheckpointError, MoerunError, shown

KiB, MiB = 1 << 10, 1 << 20


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def is_dir(path: str | Path) -> bool:
    """Path.is_dir without its exceptions: a name too long or with a NUL byte is simply not a folder."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def regular_file_size(path: str | Path, error: type[MoerunError] = CheckpointError) -> int:
    """The size of `path`, which must be an existing regular file (symlinks followed)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({_reason(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {file_kind(st.st_mode)}, not a regular file")
    return st.st_size


def read_bytes(path: str | Path, limit: int, what: str, error: type[MoerunError] = CheckpointError) -> bytes:
    """The whole of a regular file of at most `limit` bytes. `what` names the file's role in messages."""
    try:
        # O_NONBLOCK: a FIFO opens at once (and is then refused) instead of waiting forever for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({_reason(e)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: is {file_kind(mode)}; a {what} must be a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot be read ({_reason(e)})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {_size(limit)}, the most a {what} may be")
    return data


def read_text(path: str | Path, limit: int, what: str, error: type[MoerunError] = CheckpointError) -> str:
    return decode_utf8(read_bytes(path, limit, what, error), str(path), error)


def decode_utf8(data: bytes, where: str, error: type[MoerunError] = CheckpointError) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json_object(path: str | Path, limit: int, what: str, error: type[MoerunError] = CheckpointError) -> dict:
    return parse_json_object(read_text(path, limit, what, error), str(path), error)


def parse_json_object(text: str, where: str, error: type[MoerunError] = CheckpointError) -> dict[str, Any]:
    """A JSON object. Python's json accepts repeated keys (the last wins, silently) and recurses per nesting
    level; both are refused here as errors, like any syntax error."""
    try:
        data = json.loads(text, object_pairs_hook=_no_repeated_keys)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    except _RepeatedKey as e:
        raise error(f"{where}: key {e.args[0]} appears twice in one object") from None
    except ValueError as e:  # JSONDecodeError, and int literals beyond Python's digit limit
        raise error(f"{where}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object {{...}}, got a JSON {_json_kind(data)}")
    return data


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(shown(key))
        out[key] = value
    return out


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
