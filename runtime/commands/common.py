"""What several commands share: the target a config names (checked before any weight loads), building an engine
with a progress bar, checked flags and token ids, tables, and output files checked first and written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.files import file_kind, is_dir
from moerun.runtime.model_config import ModelConfig, load_model_config
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.table import format_table

MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


def demo_config_path() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo.yaml"))


@dataclasses.dataclass(frozen=True)
class Target:
    """A run config with its checkpoint folder and model config: all a command checks a request against
    before it spends time loading weights."""

    run: RunConfig
    folder: Path
    config: ModelConfig

    @property
    def limits(self):
        from moerun.runtime.limits import RequestLimits

        return RequestLimits.of(self.run, self.config)


def load_target(config: str | None) -> Target:
    """The config file (the embedded demo when None), its checkpoint folder (the random demo is built on first use)
    and that folder's config.json, each checked."""
    from moerun.runtime.engine import resolve_model_folder

    run = load_run_config(demo_config_path() if config is None else config)
    folder = resolve_model_folder(run.model_path)
    return Target(run, folder, load_model_config(folder))


def load_engine(target: Target | RunConfig | str | None, num_layers: int | None = None, label: str = "loading"):
    """Build the engine of a target, a run config or a YAML file (the embedded demo when None), with a progress
    bar over the checkpoint's bytes."""
    from moerun.runtime.engine import Engine

    if isinstance(target, Target):
        run = target.run
    elif isinstance(target, RunConfig):
        run = target
    else:
        run = load_run_config(demo_config_path() if target is None else target)
    with contextlib.ExitStack() as stack:
        return Engine(run, num_layers=num_layers, progress=ByteProgress(stack, f"{label} {run.backend}"))


class FiniteFloat(click.FloatRange):
    """click.FloatRange, minus NaN and infinity (which every range comparison lets through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


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
        raise MoerunError(f"--token-ids: expected comma-separated integers like 1,5,9, got {text[:60]!r}") from None
    if not ids:
        raise MoerunError("--token-ids: no token ids given")
    return ids


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    click.echo(format_table(headers, rows))


def check_output_path(text: str, option: str = "--out") -> Path:
    """Refuse, before any work, an output path moerun could not write: a missing or unwritable folder, or an
    existing target that is not a regular file (a directory, a device node, a FIFO: writing replaces the
    target whole, which must never happen to /dev/sda). A probe file proves the folder takes new files."""
    path = Path(text)
    if not path.name or text.endswith(os.sep):
        raise MoerunError(f"{option}: {text!r} names a folder; give a file name")
    if not is_dir(path.parent):
        raise MoerunError(f"{option}: folder {path.parent} does not exist")
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise MoerunError(f"{option}: {path} is {file_kind(mode)}; moerun writes only regular files")
    except FileNotFoundError:
        pass
    except OSError as e:
        raise MoerunError(f"{option}: {path}: {e.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MoerunError(f"{option}: cannot write in {path.parent} ({e.strerror})") from None
    return path


def write_atomically(path: Path, write: Callable[[BinaryIO], None], option: str = "--out") -> None:
    """Never leave a half-written file at `path`: write beside it, then rename; on any failure (a full disk,
    Ctrl-C) the temporary file is removed and `path` is untouched."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise MoerunError(f"{option}: cannot write in {path.parent} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's private 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise MoerunError(f"{option}: cannot write {path} ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    write_atomically(path, lambda f: np.save(f, array))
