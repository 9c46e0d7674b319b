"""`moerun logits`: teacher-forced next-token logits of given token ids, written as a .npy file."""

from __future__ import annotations

import click

from moerun.runtime.commands.common import (check_output_path, load_engine, load_target, parse_token_ids,
                                            write_atomically)


@click.command()
@click.option("-c", "--config", type=str, required=True, help="YAML target.")
@click.option("--token-ids", required=True, help="Comma-separated token ids, e.g. 1,5,9.")
@click.option("--out", required=True, help="Output .npy: float32 [T, vocab].")
def logits(config, token_ids, out):
    """Teacher-forced next-token logits at every position, through the prefill path."""
    import numpy as np

    ids = parse_token_ids(token_ids)
    out_path = check_output_path(out)
    target = load_target(config)
    target.limits.check_token_ids(ids)
    target.limits.check_lengths([len(ids)], f"--token-ids ({len(ids)} ids)")
    engine = load_engine(target)
    values = engine.logits(ids).numpy().astype(np.float32)
    write_atomically(out_path, lambda f: np.save(f, values))
    click.echo(f"wrote {out_path}: float32 {list(values.shape)} (positions x vocab)")
