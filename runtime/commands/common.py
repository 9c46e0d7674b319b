"""What several commands share: the target a config names (checked before any weight loads), building an engine
with a progress bar, checked flags and token ids, tables, and output files checked first and written atomically."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.files import file_kind, is_dir
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.table import format_table

if TYPE_CHECKING:
    from moerun.runtime.target import Target

MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


def demo_config_path() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo.yaml"))


def load_target(config: str | None) -> Target:
    """The target of a YAML file (the embedded demo when None), checked up to its config.json."""
    from moerun.runtime.target import target_of

    return target_of(load_run_config(demo_config_path() if config is None else config))


def load_engine(target: Target | RunConfig | str | None, num_layers: int | None = None, label: str = "loading"):
    """Build the engine of a target, a run config or a YAML file (the embedded demo when None), with a progress
    bar over the checkpoint's bytes.

    Under torchrun only rank 0 goes on with the command (and shows the bar): every other rank runs the steps rank
    0 sends and then ends here (exit 0). Rank 0 tells them to stop when its command is done, whether it succeeded
    or not."""
    from moerun.runtime.engine import Engine
    from moerun.runtime.launch import launch_env
    from moerun.runtime.target import Target

    if isinstance(target, Target):
        run = target.run
    elif isinstance(target, RunConfig):
        run = target
    else:
        run = load_run_config(demo_config_path() if target is None else target)
    first = launch_env().rank == 0
    with contextlib.ExitStack() as stack:
        engine = Engine(run, num_layers=num_layers,
                        progress=ByteProgress(stack, f"{label} {run.backend}") if first else None)
    if not engine.comm.is_first:
        engine.run_worker()
        engine.close()
        raise SystemExit(0)
    context = click.get_current_context(silent=True)
    # On one rank there is nothing to close, and the callback would keep the engine alive until the command ends.
    if context is not None and engine.comm.world.size > 1:
        context.call_on_close(engine.close)
    return engine


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

