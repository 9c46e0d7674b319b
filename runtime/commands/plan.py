"""`moerun plan`: will this model fit these devices, and how many KV tokens are left, for every TP x EP layout.
Reads config.json only (no weights), so it runs before a 230 GB download."""

from __future__ import annotations

import os
from pathlib import Path

import click

from moerun.runtime import capacity
from moerun.runtime.capacity import FP8, W8A8, Format, LayoutPlan
from moerun.runtime.commands.common import print_table
from moerun.runtime.devices import Devices, parse_devices
from moerun.runtime.model_config import ModelConfig, load_model_config
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.shard_plan import ShardPlan

WEIGHT_CHOICES = (FP8, W8A8, "bfloat16", "float16", "float32")


@click.command()
@click.option("-c", "--config", type=str, required=True, help="YAML target (its model.path needs config.json only).")
@click.option("--devices", default=None,
              help="KIND:COUNT, KIND one of h100-80g, h200-141g, 910b-64g, 910c-64g-die, or a size like 96g "
                   "(GB) / 96gi (GiB). Default: this machine's devices, as many as the config's layout needs.")
@click.option("--weights", type=click.Choice(WEIGHT_CHOICES), default=None,
              help="Plan as if the weights were held so (default: what the checkpoint and backend give).")
def plan(config, devices, weights):
    """Per-rank weight bytes, KV bytes per token, and the KV tokens that fit, for every TP x EP layout."""
    from moerun.runtime.engine import resolve_model_folder

    run = load_run_config(config)
    folder = resolve_model_folder(run.model_path)
    cfg = load_model_config(folder)
    fmt, how = weight_format(run, cfg, folder, weights)
    devs = parse_devices(devices) if devices else this_machine(run)
    sched = run.scheduler
    layouts = capacity.plan_layouts(cfg, fmt, devs.memory, devs.count, run.kv_memory_fraction,
                                    sched.max_num_batched_tokens, sched.max_num_seqs, accelerator=devs.kind != "cpu",
                                    fp8_executed=fmt.linears == FP8)
    whole = capacity.weight_bytes(cfg, ShardPlan(), fmt).total
    per_token = capacity.kv_bytes_per_token(cfg, ShardPlan(), fmt.dtype)
    workspace = capacity.ACCELERATOR_WORKSPACE if devs.kind != "cpu" else 0
    click.echo(f"model: {cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads of "
               f"{cfg.head_dim}, {cfg.num_experts} experts of {cfg.intermediate_size} (top {cfg.top_k}), vocabulary "
               f"{cfg.vocab_size} ({folder / 'config.json'})")
    click.echo(f"weights: {how}; {_gb(whole)} in all")
    click.echo(f"KV cache: {fmt.dtype}, {per_token:,} B per token for the whole model ({_gb(per_token * 10**6)} per "
               f"1M tokens)")
    click.echo(f"devices: {devs.describe()}; memory fraction {run.kv_memory_fraction:g}; reserve per rank = "
               f"{_gb(workspace)} workspace + activations of a {sched.max_num_batched_tokens}-token step "
               f"({sched.max_num_seqs} sequences)")
    max_len = sched.max_model_len or cfg.max_position_embeddings
    chosen = (run.parallel.tensor_parallel_size, run.parallel.expert_parallel_size or devs.count)
    rows = [_row(p, chosen, max_len) for p in sorted(layouts, key=lambda p: (p.refused is not None, -p.kv_tokens))]
    print_table(["layout", "weights/rank", "KV B/token/rank", "reserve/rank", "KV tokens", "fits", "note"], rows)
    click.echo(f"* the config's layout. fits: yes = holds at least one {max_len:,}-token sequence "
               f"(scheduler.max_model_len, else the model's maximum)")


def weight_format(run: RunConfig, cfg: ModelConfig, folder: Path, override: str | None) -> tuple[Format, str]:
    """How the weights will sit in memory, and a phrase saying why."""
    from moerun.backends.base import get_backend_class
    from moerun.runtime.w8a8_format import is_w8a8_folder

    dtype = run.dtype_name
    block = cfg.fp8_block or (128, 128)
    if override:
        return Format(override, dtype, block), f"{override} (--weights)"
    backend = get_backend_class(run.backend)
    if is_w8a8_folder(folder):
        if backend.capabilities.w8a8:
            return Format(W8A8, dtype), f"w8a8 (msModelSlim W8A8_DYNAMIC, run as int8 by the {run.backend} backend)"
        return Format(dtype, dtype), f"{dtype} (a W8A8 checkpoint the {run.backend} backend dequantizes at load)"
    if cfg.fp8_block is not None:
        if backend.keeps_fp8(run.backend_options):
            return (Format(FP8, dtype, block),
                    f"fp8 (the checkpoint's {block[0]}x{block[1]} blocks, executed as stored by the {run.backend} "
                    f"backend)")
        return Format(dtype, dtype, block), f"{dtype} (the FP8 checkpoint dequantized at load by the {run.backend} backend)"
    return Format(dtype, dtype), f"{dtype} (a float checkpoint)"


def this_machine(run: RunConfig) -> Devices:
    """The config's backend's device, times the ranks the config's layout needs (WORLD_SIZE when set)."""
    from moerun.backends.base import get_backend_class
    from moerun.runtime.memory import host_memory_total

    backend = get_backend_class(run.backend)(run.backend_options, run.dtype)
    info = backend.device_info()
    memory = info.get("memory_total") or (host_memory_total() if backend.device.type == "cpu" else None)
    if memory is None:
        from moerun.backends.errors import MoerunError

        raise MoerunError(f"the {run.backend} backend does not report its device's memory: give --devices KIND:COUNT")
    count = int(os.environ.get("WORLD_SIZE") or max(run.parallel.tensor_parallel_size,
                                                     run.parallel.expert_parallel_size or 1))
    kind = "cpu" if backend.device.type == "cpu" else info.get("name", str(backend.device))
    return Devices(kind, memory, count)


def _row(p: LayoutPlan, chosen: tuple[int, int], max_len: int) -> list[str]:
    mark = "*" if (p.tp, p.ep) == chosen else ""
    layout = f"{mark}TP{p.tp} x EP{p.ep}"
    if p.refused:
        return [layout, "-", "-", "-", "-", "refused", p.refused]
    if p.kv_tokens <= 0:
        fits, note = "no", f"short by {_gb(-p.kv_tokens * p.kv_per_token)} per rank"
    elif p.kv_tokens < max_len:
        fits, note = "short", f"less than one {max_len:,}-token sequence"
    else:
        full = p.kv_tokens // max_len
        fits, note = "yes", f"{full} full-length sequence{'s' if full > 1 else ''}"
    if p.notes:
        note = "; ".join([note, *p.notes])
    return [layout, _gb(p.weights), f"{p.kv_per_token:,}", _gb(p.reserve), f"{max(p.kv_tokens, 0):,}", fits, note]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
