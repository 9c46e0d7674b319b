"""`moerun fingerprint`: write a checkpoint's manifest (tensor and file hashes, one digest, optional reference
probes), or check a checkpoint against one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.commands.common import ByteProgress, check_output_path, load_engine, write_atomically
from moerun.runtime.fingerprint import Fingerprint, compare, fingerprint as fingerprint_folder, read_manifest
from moerun.runtime.answer_probes import ANSWER_TOKENS
from moerun.runtime.probes import PROBE_TOKENS


@click.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Compare CHECKPOINT with MANIFEST: exit 0 when all match, 1 otherwise.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Where to write the manifest (JSON).")
@click.option("--probes-config", type=click.Path(dir_okay=False), default=None,
              help="YAML of a trusted configuration of this checkpoint: add its reference probes to the manifest.")
@click.option("--floor-config", type=click.Path(dir_okay=False), default=None,
              help="YAML of a second faithful configuration, whose distance to the probes is the floor verify judges "
                   "by [default: the probes config in bfloat16, or in float32 when that is bfloat16/float16].")
@click.option("--probe-tokens", type=click.IntRange(1, 4096), default=PROBE_TOKENS, show_default=True,
              help="Greedy tokens per probe.")
@click.option("--answer-tokens", type=click.IntRange(1, 65536), default=ANSWER_TOKENS, show_default=True,
              help="Tokens per reference answer to the tool and reasoning prompts (verify asks the endpoint as many).")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="Shards hashed in parallel (0: one per core).")
def fingerprint(checkpoint, manifest, check, out, probes_config, floor_config, probe_tokens, answer_tokens, threads):
    """Hash every tensor and the config, tokenizer and chat template files of CHECKPOINT.

    moerun fingerprint CHECKPOINT --out manifest.json [--probes-config trusted.yaml [--floor-config faithful.yaml]]

    moerun fingerprint --check CHECKPOINT manifest.json"""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if check:
        if manifest is None or out is not None or probes_config is not None or floor_config is not None:
            raise MoerunError("--check takes CHECKPOINT and MANIFEST (no --out, no --probes-config, no --floor-config)")
        _check(folder, Path(manifest), threads)
        return
    if manifest is not None or out is None:
        raise MoerunError("give --out MANIFEST to write a manifest, or --check CHECKPOINT MANIFEST to check one")
    out_path = check_output_path(out)
    probe_run, floor_run = _probe_runs(probes_config, floor_config, folder) if probes_config else (None, None)
    if floor_config and not probes_config:
        raise MoerunError("--floor-config needs --probes-config (the floor is measured on the trusted probes)")

    fp = _hash(folder, threads)
    data = fp.to_json()
    head = {"format": data.pop("format"), "digest": data.pop("digest"), "checkpoint": str(folder.resolve())}
    if probe_run is not None:
        data["probes"] = _record(probe_run, probes_config, floor_run, floor_config, probe_tokens, answer_tokens)
    data = {**head, **data}
    data["tensors"] = data.pop("tensors")  # last: the long part
    write_atomically(out_path, lambda f: f.write(format_manifest(data).encode()))
    size = sum(t.nbytes for t in fp.tensors.values())
    probes = f", {len(data['probes']['cases'])} probes" if probe_run is not None else ""
    click.echo(f"{len(fp.tensors)} tensors ({size / 1e9:.3g} GB), {len(fp.files)} files, chat template "
               f"{fp.chat_template_source or 'none'}{probes}\ndigest {fp.digest}\nwrote {out_path}")


def _record(probe_run, probes_source: str, floor_run, floor_source: str | None, probe_tokens: int,
            answer_tokens: int) -> dict:
    """The probes, template counts and reference answers from the trusted configuration, then the floor from the
    second one: one engine alive at a time."""
    from moerun.runtime.answer_probes import engine_completion, record_answers, record_template_counts
    from moerun.runtime.probes import record_floor, record_probes

    engine = load_engine(probe_run, label="loading probes config")
    probes = record_probes(engine, probes_source, probe_tokens)
    probes["template"] = record_template_counts(engine.tokenizer)
    probes["answers"] = record_answers(engine.tokenizer, engine_completion(engine), answer_tokens)
    del engine
    engine = load_engine(floor_run, label="loading floor config")
    probes["floor"] = record_floor(engine, floor_source or f"{probes_source} in {floor_run.dtype_name}",
                                   probes["cases"])
    return probes


def other_precision(run):
    """The trusted configuration one precision step away: bfloat16 under a float32 or float64 one (the precision
    deployments serve in), float32 under a 16-bit one. Either way the floor is a 16-bit run's distance to a
    wider one, the rounding a faithful 16-bit deployment brings."""
    import torch

    return dataclasses.replace(run, dtype=torch.bfloat16 if run.dtype.itemsize >= 4 else torch.float32,
                               source=f"{run.source} (floor: other precision)")


def _hash(folder: Path, threads: int) -> Fingerprint:
    with contextlib.ExitStack() as stack:
        return fingerprint_folder(folder, threads, ByteProgress(stack, "hashing"))


def _check(folder: Path, manifest: Path, threads: int) -> None:
    expected = Fingerprint.from_json(read_manifest(manifest), str(manifest))
    actual = _hash(folder, threads)
    differences = compare(expected, actual)
    for line in differences:
        click.echo(line)
    if differences:
        click.echo(f"FAIL: {len(differences)} difference{'s' * (len(differences) > 1)} between {folder} and "
                   f"{manifest} (checkpoint {actual.digest}, manifest {expected.digest})")
        sys.exit(1)
    template = f" and the chat template ({actual.chat_template_source})" if actual.chat_template else ""
    click.echo(f"OK: {len(actual.tensors)} tensors, {len(actual.files)} files{template} match {manifest} "
               f"({actual.digest})")


def _probe_runs(probes_config: str, floor_config: str | None, folder: Path):
    """The trusted configuration and the floor's, both checked before any hashing."""
    from moerun.runtime.target import checked_target

    probe_run = _probe_run(probes_config, "--probes-config", folder)
    if floor_config is None:
        return probe_run, checked_target(other_precision(probe_run)).run
    floor_run = _probe_run(floor_config, "--floor-config", folder)
    if dataclasses.replace(floor_run, source="") == dataclasses.replace(probe_run, source=""):
        raise MoerunError(f"--floor-config: {floor_config} is the probes configuration itself; the floor needs a "
                          f"second one (another dtype or backend)")
    return probe_run, floor_run


def _probe_run(config: str, option: str, folder: Path):
    """A configuration to probe, checked (YAML, checkpoint, backend) before any hashing; it must run this very
    checkpoint."""
    from moerun.runtime.target import checked_target
    from moerun.runtime.run_config import load_run_config

    checked = checked_target(load_run_config(config))
    if not os.path.samefile(checked.folder, folder):
        raise MoerunError(f"{option}: {config} runs {checked.folder}, not the fingerprinted {folder}")
    return checked.run


def format_manifest(data: dict) -> str:
    """JSON that reads and diffs line by line: containers spread over lines down to the probe cases' fields, and
    anything that fits in 160 characters on one line (one tensor per line)."""
    return _format(data, 0) + "\n"


def _format(value, depth: int) -> str:
    compact = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if depth >= 4 or len(compact) <= 160 or not isinstance(value, (dict, list)) or not value:
        return compact
    pad = " " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return "[\n" + ",\n".join(pad + _format(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
