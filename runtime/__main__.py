"""The `moerun` program: the console script and `python -m moerun.runtime` both start here.

Signals are handled before anything else is imported: until main() runs, Ctrl-C or SIGTERM ends the process at
once with one line (nothing has been written yet); while it runs, they unwind it (so temporary files are
removed) and main() prints one line and returns 130 or 143; after it returns they end the process at once,
so interpreter shutdown cannot print a traceback either. (The interpreter's own start-up, before this module
runs, is the one window left: a signal there still gets Python's default treatment.)
"""

import os
import signal
import sys


def _exit_now(signum, frame):
    os.write(2, b"moerun: interrupted\n" if signum == signal.SIGINT else b"moerun: terminated\n")
    os._exit(128 + signum)


signal.signal(signal.SIGINT, _exit_now)
signal.signal(signal.SIGTERM, _exit_now)

from moerun.runtime import cli  # noqa: E402 (after the handlers, on purpose)


def _quiet_signal_unraisable(unraisable) -> None:
    # A signal landing in a finalizer or weakref callback (an import lock's, say) raises where Python can only
    # print "Exception ignored in ..."; cli.raise_on_signal has recorded it, and main() reports it in one line.
    if not issubclass(unraisable.exc_type, (KeyboardInterrupt, cli.Terminated)):
        sys.__unraisablehook__(unraisable)


def console_main() -> None:
    code = cli.EXIT_INTERRUPTED
    sys.unraisablehook = _quiet_signal_unraisable
    try:
        signal.signal(signal.SIGINT, cli.raise_on_signal)
        signal.signal(signal.SIGTERM, cli.raise_on_signal)
        code = cli.main()
    except KeyboardInterrupt:  # the few bytecodes between the handler switch and main's own try
        code = cli.signal_exit(signal.SIGINT)
    except cli.Terminated:
        code = cli.signal_exit(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, _exit_now)
        signal.signal(signal.SIGTERM, _exit_now)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
