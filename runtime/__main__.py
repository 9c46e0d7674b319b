"""The `moerun` program: the console script and `python -m moerun.runtime` both start here.

Signals are handled before anything else is imported: until main() runs, Ctrl-C or SIGTERM ends the process at
once with one line (nothing has been written yet); while it runs, they unwind it (so temporary files are
removed) and main() prints one line and returns 130 or 143; after it returns they end the process at once,
so interpreter shutdown cannot print a traceback either.
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


def _raise_terminated(signum, frame):
    raise cli.Terminated


def console_main() -> None:
    code = cli.EXIT_INTERRUPTED
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)
        code = cli.main()
    except KeyboardInterrupt:  # the few bytecodes between the handler switch and main's own try
        os.write(2, b"moerun: interrupted\n")
    except cli.Terminated:
        os.write(2, b"moerun: terminated\n")
        code = cli.EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGINT, _exit_now)
        signal.signal(signal.SIGTERM, _exit_now)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
