"""`moerun fingerprint`: write a checkpoint's manifest (tensor and file hashes, one digest, optional reference
probes), or check a checkpoint against one."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from moerun.backends.errors import CheckpointError, MoerunError
from moerun.runtime.commands.common import ByteProgress, check_output_path, load_engine, write_atomically
from moerun.runtime.fingerprint import Fingerprint, compare, fingerprint as fingerprint_folder
from moerun.runtime.probes import PROBE_TOKENS

_MAX_MANIFEST = 1 << 30  # a manifest of the 230B release with probes is ~30 MB


@click.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Compare CHECKPOINT with MANIFEST: exit 0 when all match, 1 otherwise.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Where to write the manifest (JSON).")
@click.option("--probes-config", type=click.Path(dir_okay=False), default=None,
              help="YAML of a trusted configuration of this checkpoint: add its reference probes to the manifest.")
@click.option("--probe-tokens", type=click.IntRange(1, 4096), default=PROBE_TOKENS, show_default=True,
              help="Greedy tokens per probe.")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="Shards hashed in parallel (0: one per core).")
def fingerprint(checkpoint, manifest, check, out, probes_config, probe_tokens, threads):
    """Hash every tensor and the config, tokenizer and chat template files of CHECKPOINT.

    moerun fingerprint CHECKPOINT --out manifest.json [--probes-config trusted.yaml]

    moerun fingerprint --check CHECKPOINT manifest.json"""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if check:
        if manifest is None or out is not None or probes_config is not None:
            raise MoerunError("--check takes CHECKPOINT and MANIFEST (no --out, no --probes-config)")
        _check(folder, Path(manifest), threads)
        return
    if manifest is not None or out is None:
        raise MoerunError("give --out MANIFEST to write a manifest, or --check CHECKPOINT MANIFEST to check one")
    out_path = check_output_path(out)
    probe_run = _probe_run(probes_config, folder) if probes_config else None

    fp = _hash(folder, threads)
    data = fp.to_json()
    head = {"format": data.pop("format"), "digest": data.pop("digest"), "checkpoint": str(folder.resolve())}
    if probe_run is not None:
        engine = load_engine(probe_run, label="loading probes config")
        from moerun.runtime.probes import record_probes

        data["probes"] = record_probes(engine, probes_config, probe_tokens)
        del engine
    data = {**head, **data}
    data["tensors"] = data.pop("tensors")  # last: the long part
    write_atomically(out_path, lambda f: f.write(format_manifest(data).encode()))
    size = sum(t.nbytes for t in fp.tensors.values())
    probes = f", {len(data['probes']['cases'])} probes" if probe_run is not None else ""
    click.echo(f"{len(fp.tensors)} tensors ({size / 1e9:.3g} GB), {len(fp.files)} files, chat template "
               f"{fp.chat_template_source or 'none'}{probes}\ndigest {fp.digest}\nwrote {out_path}")


def _hash(folder: Path, threads: int) -> Fingerprint:
    with contextlib.ExitStack() as stack:
        return fingerprint_folder(folder, threads, ByteProgress(stack, "hashing"))


def _check(folder: Path, manifest: Path, threads: int) -> None:
    if not manifest.is_file():
        raise MoerunError(f"{manifest}: manifest not found (or not a regular file)")
    if manifest.stat().st_size > _MAX_MANIFEST:
        raise MoerunError(f"{manifest}: {manifest.stat().st_size} bytes is too large for a manifest")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoerunError(f"{manifest}: not valid JSON ({e})") from None
    expected = Fingerprint.from_json(data, str(manifest))
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


def _probe_run(probes_config: str, folder: Path):
    """The trusted configuration, checked (YAML, checkpoint, backend) before any hashing; it must run this very
    checkpoint."""
    from moerun.runtime.preflight import check_configuration
    from moerun.runtime.run_config import load_run_config

    checked = check_configuration(load_run_config(probes_config))
    if not os.path.samefile(checked.folder, folder):
        raise MoerunError(f"--probes-config: {probes_config} runs {checked.folder}, not the fingerprinted {folder}")
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
