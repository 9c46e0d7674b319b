"""`moerun smoke`: load, prefill, decode and check; exit 0 only if every check passes."""

from __future__ import annotations

import sys
import time

import click

from moerun.runtime.commands.common import load_engine, load_target, print_table


@click.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("--layers", type=click.IntRange(1), default=None, help="Load only the first N decoder layers.")
@click.option("--steps", type=click.IntRange(1), default=8, show_default=True, help="Decode steps.")
def smoke(config, layers, steps):
    """Load, prefill a ragged batch, decode; check finiteness, decode == prefill, determinism. Exit 0 iff all pass."""
    from moerun.runtime.smoke import PROMPT_LENGTHS, Check, run_smoke

    t0 = time.perf_counter()
    target = load_target(config)
    target.limits.check_lengths([n + steps for n in PROMPT_LENGTHS],
                                f"smoke prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens plus --steps {steps}")
    engine = load_engine(target, num_layers=layers)
    load = Check("load", True, f"{engine.model.num_layers}/{engine.config.num_layers} layers, {engine.backend.describe()}",
                 time.perf_counter() - t0)
    checks = [load, *run_smoke(engine, steps=steps)]
    print_table(["check", "result", "seconds", "detail"],
                [[c.name, "pass" if c.passed else "FAIL", f"{c.seconds:.3f}", c.detail] for c in checks])
    if not all(c.passed for c in checks):
        sys.exit(1)
