"""The `moerun` command line. Each subcommand lives in runtime/commands/ (bench in runtime/bench.py) and is
registered here; this module owns only the group and the promise about errors.

Bad input (a missing checkpoint, a YAML typo, a token id outside the vocabulary, ...) is one line on stderr and
exit code 2; so is running out of memory. Ctrl-C is one line and exit code 130 (runtime/signals.py). `--debug`
anywhere on the line shows the traceback instead.

Subcommands are imported only when run (or listed by --help): the group itself imports nothing heavy, so the
program is answering signals and usage errors within milliseconds of starting, long before torch is loaded.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from moerun.backends.errors import MoerunError
from moerun.runtime import signals

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`moerun generate ... | head -1`)
MAX_MESSAGE = 1000  # characters of one error line; longer ones lose their middle

# name -> "module:attribute" of every subcommand, imported when that command runs.
COMMANDS = {
    "generate": "moerun.runtime.commands.generate:generate",
    "logits": "moerun.runtime.commands.logits:logits",
    "smoke": "moerun.runtime.commands.smoke:smoke",
    "parity": "moerun.runtime.commands.parity:parity",
    "fingerprint": "moerun.runtime.commands.fingerprint:fingerprint",
    "verify": "moerun.runtime.commands.verify:verify",
    "quantize": "moerun.runtime.commands.quantize:quantize",
    "serve": "moerun.runtime.commands.serve:serve",
    "plan": "moerun.runtime.commands.plan:plan",
    "bench": "moerun.runtime.bench:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        with signals.ending(at_once=True):  # importing a command imports torch: see runtime/signals.py
            return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """moerun: MiniMax-M2-family MoE inference on CPU, NVIDIA (cuda) and Ascend (ascend) backends.

    Add --debug anywhere to see tracebacks."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = _run([a for a in argv if a != "--debug"], debug)
    except BaseException:
        if signals.received is None or debug:
            raise
        code = None  # the signal's own exception was swallowed by C code, and something else broke
    if signals.received is not None and code not in (signals.EXIT_INTERRUPTED, signals.EXIT_TERMINATED):
        return signal_exit(signals.received)
    return code


def _run(argv: list[str], debug: bool) -> int:
    try:
        result = cli.main(args=argv, prog_name="moerun", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # `moerun` alone: the help, as --help shows it
        click.echo(e.ctx.get_help())
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:  # usage errors: one line, exit 2
        if debug:
            raise
        return _error(e.format_message(), EXIT_BAD_INPUT if isinstance(e, click.UsageError) else e.exit_code)
    except MoerunError as e:
        if debug:
            raise
        return _error(_rank_prefix(str(e)) + str(e), getattr(e, "exit_code", EXIT_BAD_INPUT))
    except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C inside a command into Abort
        if debug:
            raise
        return signal_exit(signal.SIGINT)
    except signals.Terminated:
        return signal_exit(signal.SIGTERM)
    except BrokenPipeError:
        # Nothing more can reach the reader; point stdout at /dev/null so the exit's flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (MemoryError, RuntimeError) as e:
        if debug or not is_out_of_memory(e):
            raise
        detail = _first_line(e) or "the allocator refused"
        return _error(f"out of memory ({detail}); load fewer layers (--layers, model.num_layers), lower "
                      f"kv_cache.num_blocks, or send a shorter request", EXIT_BAD_INPUT)


def _rank_prefix(message: str) -> str:
    """Under torchrun every rank may say the same line: each says which rank it is."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not message.startswith("rank "):
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


def signal_exit(signum: int) -> int:
    """One line and the shell's exit code for a run ended by a signal."""
    click.echo(signals.message(signum), err=True)
    return signals.exit_code(signum)


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (any device) and the allocators' RuntimeErrors (named without
    importing torch: the CLI must not pay for it before a command needs it)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def _error(message: str, code: int) -> int:
    line = " ".join(message.split())  # one line, whatever the message carried
    if len(line) > MAX_MESSAGE:
        line = f"{line[:MAX_MESSAGE * 2 // 3]} ... {line[-MAX_MESSAGE // 3:]}"
    click.echo(f"moerun: error: {line}", err=True)
    return code


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
