"""`moerun quantize --w8a8 SRC DST`: write msModelSlim's W8A8_DYNAMIC format from a float or FP8 checkpoint."""

from __future__ import annotations

import contextlib
import re
import sys

import click

from moerun.backends.errors import MoerunError

SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(KB|MB|GB)$", re.IGNORECASE)
UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
MAX_SHARD_BYTES = 1e12


def parse_size(text: str) -> int:
    match = SIZE.match(text.strip())
    size = float(match.group(1)) * UNITS[match.group(2).upper()] if match else 0.0
    if not 1 <= size <= MAX_SHARD_BYTES:  # also the 400-digit number that float() makes infinite
        raise MoerunError(f"--max-shard-size: expected a size from 1KB to 1000GB like 4GB or 500MB, got {text[:40]!r}")
    return int(size)


@click.command()
@click.option("--w8a8", is_flag=True, help="Write msModelSlim's W8A8_DYNAMIC format (the only format so far).")
@click.option("--max-shard-size", default="4GB", show_default=True, help="Largest weights file (KB, MB, GB).")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
def quantize(w8a8, max_shard_size, src, dst):
    """Quantize the MiniMax-M2 checkpoint in SRC into a new folder DST (atomically: DST appears only when done)."""
    from moerun.runtime.w8a8_quantize import quantize_w8a8

    if not w8a8:
        raise click.UsageError("choose the output format: --w8a8 (msModelSlim W8A8_DYNAMIC, the only one)")
    limit = parse_size(max_shard_size)
    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label="quantizing", file=sys.stderr))
            bar.update(1)

        summary = quantize_w8a8(src, dst, limit, progress)
    click.echo(f"wrote {dst}: W8A8_DYNAMIC, {summary.quantized_linears} int8 linears, {summary.tensors} tensors in "
               f"{summary.shards} shard(s), {summary.bytes / 1e9:.2f} GB")
