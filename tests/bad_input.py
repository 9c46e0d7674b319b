"""The bad-input promise as tests check it: run the CLI in-process and hold its result to the promise."""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path

from moerun.runtime.cli import main

# What a command may print on stderr besides one error line: the progress bar's label (not a terminal) and
# generate's closing statistics.
INFO_LINE = re.compile(r"loading |\[\d+ prompt tokens, \d+ generated in ")


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """(exit code, the "moerun: error:" lines, every non-empty stderr line) of one in-process run."""
    code = main([str(a) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, [ln for ln in err if ln.startswith("moerun: error:")], err


def assert_promise(code: int, errors: list[str], err: list[str], allowed: tuple[int, ...] = (0, 2)) -> None:
    """Exit code allowed; an error is exactly one line; nothing else on stderr but INFO_LINEs; no traceback."""
    assert code in allowed, err
    assert not any("Traceback" in ln for ln in err), err
    assert len(errors) == (1 if code == 2 else 0), err
    assert all(ln in errors or INFO_LINE.match(ln) for ln in err), err


def assert_one_line(code: int, errors: list[str], err: list[str], pattern: str) -> None:
    assert code == 2, err
    assert_promise(code, errors, err)
    assert pattern in errors[0], errors[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files a write or a demo build would leave behind if it were cut short."""
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name)


@contextlib.contextmanager
def hang_guard(seconds: int = 120):
    """Fail a case that does not return instead of hanging the suite: a bound on hangs, not a timing check."""

    def expired(signum, frame):
        raise AssertionError(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
