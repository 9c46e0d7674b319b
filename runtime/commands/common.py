"""What several commands share: building an engine with a progress bar, token-id parsing, tables, atomic output."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

import click
import numpy as np

from moerun.backends.errors import MoerunError
from moerun.runtime.run_config import load_run_config
from moerun.runtime.table import format_table


def demo_config_path() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo.yaml"))


def load_engine(config, num_layers: int | None = None, label: str = "loading"):
    """Build the engine for a YAML file (the embedded demo when None) or an already checked EnginePlan, with a
    progress bar over layers."""
    from moerun.runtime.engine import Engine, EnginePlan

    run = config if isinstance(config, EnginePlan) else load_run_config(config or demo_config_path())
    backend = (run.run if isinstance(run, EnginePlan) else run).backend
    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label=f"{label} {backend}", file=sys.stderr))
            bar.update(1)

        return Engine(run, num_layers=num_layers, progress=progress)


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


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    """Never leave a half-written file at `path`: write beside it, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
