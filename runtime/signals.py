"""How the moerun program answers Ctrl-C (SIGINT) and SIGTERM: one line, exit code 130 or 143, never a traceback.

The package's __main__.py (at the repository root) installs the handler first thing (this module imports only the
standard library). A signal then either ends the process at once or unwinds it:
- at once, with the line written straight to stderr, before main() runs, after it returns, and while a command
  module is imported: nothing is being written then, and torch's C++ start-up calls back into Python, where an
  exception raised by a handler aborts the whole process (`terminate called after throwing ...`);
- by unwinding (KeyboardInterrupt, Terminated) while a command runs, so temporary files are removed on the way
  out, and main() prints the line.
Each signal is also recorded, because C code can swallow the exception it raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

received: int | None = None  # the last signal the handler saw
_at_once = True


class Terminated(BaseException):
    """SIGTERM's counterpart of KeyboardInterrupt."""


def message(signum: int) -> str:
    return "moerun: interrupted" if signum == signal.SIGINT else "moerun: terminated"


def exit_code(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED


def install() -> None:
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


@contextlib.contextmanager
def ending(at_once: bool) -> Iterator[None]:
    """Within: a signal ends the process at once (see the module's docstring for when that is right), or raises
    KeyboardInterrupt / Terminated where the program is."""
    global _at_once
    previous, _at_once = _at_once, at_once
    try:
        yield
    finally:
        _at_once = previous


def _handle(signum: int, frame) -> None:
    global received
    received = signum
    if _at_once:
        os.write(2, (message(signum) + "\n").encode())
        os._exit(exit_code(signum))
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
