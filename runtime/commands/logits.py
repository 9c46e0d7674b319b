"""`moerun logits`: teacher-forced next-token logits of given token ids, written as a .npy file."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from moerun.backends.errors import MoerunError
from moerun.runtime.commands.common import load_engine, parse_token_ids, write_npy_atomically


@click.command()
@click.option("-c", "--config", type=str, required=True, help="YAML target.")
@click.option("--token-ids", required=True, help="Comma-separated token ids, e.g. 1,5,9.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output .npy: float32 [T, vocab].")
def logits(config, token_ids, out):
    """Teacher-forced next-token logits at every position, through the prefill path."""
    ids = parse_token_ids(token_ids)
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise MoerunError(f"--out: folder {out_path.parent} does not exist")
    engine = load_engine(config)
    values = engine.logits(ids).numpy().astype(np.float32)
    write_npy_atomically(out_path, values)
    click.echo(f"wrote {out_path}: float32 {list(values.shape)} (positions x vocab)")
