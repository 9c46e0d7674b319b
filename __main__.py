"""The `moerun` program: the console script, `python -m moerun` and each rank torchrun starts
(`torchrun --nproc-per-node N -m moerun serve -c X`) all start here. Signal handling comes first
(runtime/signals.py), before anything slow is imported; the interpreter's own start-up, before this module runs, is
the one window where a signal still gets Python's default treatment.

pyproject.toml maps the package `moerun` to the repository root, whose packages are runtime/, backends/ and
configs/; this file is the one module at that level, so an installed wheel holds it as moerun/__main__.py."""

import signal
import sys

from moerun.runtime import signals

signals.install()

from moerun.runtime import cli  # noqa: E402 (after the handler, on purpose)


def _quiet_signal_unraisable(unraisable) -> None:
    # A signal landing in a finalizer or weakref callback (an import lock's, say) raises where Python can only
    # print "Exception ignored in ..."; it is recorded, and main() reports it in one line.
    if not issubclass(unraisable.exc_type, (KeyboardInterrupt, signals.Terminated)):
        sys.__unraisablehook__(unraisable)


def console_main() -> None:
    sys.unraisablehook = _quiet_signal_unraisable
    code = signals.EXIT_INTERRUPTED
    try:
        with signals.ending(at_once=False):
            code = cli.main()
    except (KeyboardInterrupt, signals.Terminated):  # the few bytecodes around main's own try
        code = cli.signal_exit(signals.received or signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
