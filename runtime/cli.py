"""The `moerun` command line. Each subcommand lives in runtime/commands/ (bench in runtime/bench.py) and is
registered here; this module owns only the group and the promise about errors.

Bad input (a missing checkpoint, a YAML typo, a token id outside the vocabulary, ...) is one line on stderr and
exit code 2; `--debug` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

import click

from moerun.backends.errors import MoerunError

EXIT_BAD_INPUT = 2

# "module:attribute" of every subcommand, imported when the group is built.
COMMANDS = (
    "moerun.runtime.commands.generate:generate",
    "moerun.runtime.commands.logits:logits",
    "moerun.runtime.commands.smoke:smoke",
    "moerun.runtime.commands.parity:parity",
    "moerun.runtime.commands.fingerprint:fingerprint",
    "moerun.runtime.commands.quantize:quantize",
    "moerun.runtime.bench:bench",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """moerun: MiniMax-M2-family MoE inference on CPU, NVIDIA (cuda) and Ascend (ascend) backends.

    Add --debug anywhere to see tracebacks."""


for _target in COMMANDS:
    _module, _name = _target.split(":")
    cli.add_command(getattr(importlib.import_module(_module), _name))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = cli.main(args=argv, prog_name="moerun", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:  # usage errors: one line, exit 2
        if debug:
            raise
        click.echo(f"moerun: error: {e.format_message()}", err=True)
        return EXIT_BAD_INPUT if isinstance(e, click.UsageError) else e.exit_code
    except MoerunError as e:
        if debug:
            raise
        click.echo(f"moerun: error: {e}", err=True)
        return EXIT_BAD_INPUT
    except click.Abort:
        click.echo("moerun: aborted", err=True)
        return 130


def console_main() -> None:
    sys.exit(main())
