"""The `moerun` subcommands, one module each; runtime/cli.py registers them (COMMANDS) and turns errors into
one line and an exit code."""
