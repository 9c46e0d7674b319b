"""What several commands share: building an engine with a progress bar, token-id parsing, tables, atomic output."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import click
import numpy as np

from moerun.backends.errors import MoerunError
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.table import format_table


def demo_config_path() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo.yaml"))


def load_engine(config, num_layers: int | None = None, label: str = "loading"):
    """Build the engine for a YAML file (the embedded demo when None) or a RunConfig, with a progress bar over
    layers."""
    from moerun.runtime.engine import Engine

    run = config if isinstance(config, RunConfig) else load_run_config(config or demo_config_path())
    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label=f"{label} {run.backend}", file=sys.stderr))
            bar.update(1)

        return Engine(run, num_layers=num_layers, progress=progress)


class ByteProgress:
    """A progress bar over bytes on stderr, with GB done and GB/s; call it with (bytes done, bytes total)."""

    def __init__(self, stack: contextlib.ExitStack, label: str) -> None:
        self.stack, self.label = stack, label
        self.bar = None
        self.shown = 0
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.stack.enter_context(click.progressbar(
                length=max(total, 1), label=self.label, file=sys.stderr, item_show_func=lambda text: text))
        rate = done / 1e9 / max(time.monotonic() - self.start, 1e-9)
        self.bar.update(done - self.shown, f"{done / 1e9:.2f}/{total / 1e9:.2f} GB, {rate:.2f} GB/s")
        self.shown = done


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise MoerunError(f"--token-ids: expected comma-separated integers like 1,5,9, got {text!r}") from None
    if not ids:
        raise MoerunError("--token-ids: no token ids given")
    return ids


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    click.echo(format_table(headers, rows))


def check_output_path(path: Path, option: str = "--out") -> None:
    """Refuse an output path before any work is done: its folder must exist and be writable, and the path itself
    must be a regular file or not exist yet (never a folder or a device node, which a rename would replace)."""
    parent = path.parent
    if not parent.is_dir():
        raise MoerunError(f"{option}: folder {parent} does not exist")
    if path.exists() and not path.is_file():
        raise MoerunError(f"{option}: {path} exists and is not a regular file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoerunError(f"{option}: cannot write in {parent}")


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Never leave a half-written file at `path`: write(file) beside it, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    write_atomically(path, lambda f: np.save(f, array))
