"""`moerun parity`: the same tokens through a reference and a candidate configuration, judged against the noise floor
of a high-precision run (or, on request, against fixed thresholds), and per layer on request.

Every configuration is checked (YAML, checkpoint config and tensor set, backend, token ids) before any is loaded;
then each is loaded, run and freed in turn, so at most one engine is alive at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.commands.common import FiniteFloat, load_engine, parse_token_ids, print_table
from moerun.runtime.files import MiB, read_text
from moerun.runtime.parity import (Calibration, Thresholds, calibrated_verdict, compare_logits, compare_stages,
                                   stage_floors)

_FIXED = ("max_abs_rel", "mean_kl", "max_kl", "min_top1", "min_top5")


@click.command()
@click.option("-c", "--config", "configs", multiple=True, required=True, help="Reference YAML, then candidate YAML.")
@click.option("--token-ids", multiple=True, help="Comma-separated token ids: one sequence (repeat for more).")
@click.option("--prompts", default=None,
              help="Text file, one prompt per line, tokenized with the reference's tokenizer.")
@click.option("--k", "k", type=FiniteFloat(1.0), default=None,
              help=f"Calibrated: the candidate's mean KL to HP may be k x the reference's (+ epsilon) [{Calibration.k:g}].")
@click.option("--epsilon", type=FiniteFloat(0.0), default=None, help=f"Calibrated: absolute KL allowance in nats [{Calibration.epsilon:g}].")
@click.option("--top1-margin", type=FiniteFloat(0.0, 1.0), default=None,
              help="Calibrated: how far the candidate's top-1 agreement with HP may fall below the reference's "
                   "[2 standard errors + 1 position].")
@click.option("--hp-dtype", type=click.Choice(["auto", "float32", "float64"]), default="auto", show_default=True,
              help="The high-precision run's dtype; auto: float32 for a 16-bit reference, float64 for a float32 one.")
@click.option("--max-abs-rel", type=FiniteFloat(0.0), default=None, help="Fixed: max |A-B| / max|A| (off unless given).")
@click.option("--mean-kl", type=FiniteFloat(0.0), default=None, help=f"Fixed: mean KL(A||B) [{Thresholds.mean_kl:g}].")
@click.option("--max-kl", type=FiniteFloat(0.0), default=None, help="Fixed: max per-position KL (off unless given).")
@click.option("--min-top1", type=FiniteFloat(0.0, 1.0), default=None, help=f"Fixed: top-1 agreement [{Thresholds.min_top1:g}].")
@click.option("--min-top5", type=FiniteFloat(0.0, 1.0), default=None, help=f"Fixed: top-5 overlap [{Thresholds.min_top5:g}].")
@click.option("--fixed", is_flag=True, help="The fixed verdict with its default thresholds (any fixed threshold implies it).")
@click.option("--per-layer", is_flag=True, help="Also compare each layer's attention, router and MoE outputs.")
def parity(configs, token_ids, prompts, k, epsilon, top1_margin, hp_dtype, max_abs_rel, mean_kl, max_kl, min_top1,
           min_top5, fixed, per_layer):
    """Run the same tokens through two configurations and compare next-token distributions. Exit 1 if beyond.

    By default the candidate is judged against the noise floor: a high-precision run HP of the reference's
    checkpoint (cpu backend, float32 or float64) measures how far the reference itself is from exact arithmetic,
    and the candidate passes when it is about as close to HP (docs/fidelity.md)."""
    from moerun.runtime.launch import launch_env
    from moerun.runtime.target import checked_target
    from moerun.runtime.run_config import load_run_config

    if launch_env().world_size > 1:
        raise MoerunError("parity loads its configurations one after another on one device: run it without torchrun")
    if len(configs) != 2:
        raise MoerunError(f"-c: parity takes exactly two configs (reference, candidate), got {len(configs)}")
    if bool(token_ids) == (prompts is not None):
        raise MoerunError("give exactly one of --token-ids or --prompts")
    given = {name: value for name, value in zip(_FIXED, (max_abs_rel, mean_kl, max_kl, min_top1, min_top5))
             if value is not None}
    fixed = fixed or bool(given)
    if fixed and (k is not None or epsilon is not None or top1_margin is not None or hp_dtype != "auto"):
        raise MoerunError("--k, --epsilon, --top1-margin and --hp-dtype belong to the calibrated verdict; --fixed, "
                          "--mean-kl, --max-kl, --min-top1, --min-top5 and --max-abs-rel to the fixed one: give one kind")
    cal = _calibration(k, epsilon, top1_margin)

    # Everything is checked before anything is loaded: a bad candidate is reported without running the reference.
    runs = [load_run_config(c) for c in configs]
    if not fixed:
        runs.insert(0, high_precision_run(runs[0], hp_dtype))
    checked = [checked_target(run) for run in runs]
    vocab = {c.config.vocab_size for c in checked}
    if len(vocab) > 1:
        raise MoerunError(f"the configs have different vocabularies ({', '.join(str(c.config.vocab_size) for c in checked)})")
    sequences = _sequences(token_ids, prompts, checked[0 if fixed else 1].folder)
    for i, s in enumerate(sequences):
        for c in checked:
            c.check_prompt(s, f"sequence {i + 1}")

    labels = (["loading high-precision"] if not fixed else []) + ["loading reference", "loading candidate"]
    outputs = []
    for run, label in zip(runs, labels):
        outputs.append(_run(run, sequences, per_layer, label))
        gc.collect()  # the engine is gone before the next one loads
    if fixed:
        _report_fixed(configs, outputs, Thresholds(**given), per_layer)
    else:
        _report_calibrated(configs, runs[0], outputs, cal, per_layer)


def high_precision_run(reference, hp_dtype: str):
    """The reference's checkpoint and layers on the cpu backend one step finer than the reference (float32 under a
    16-bit reference: 2^16 finer than bf16; float64 under float32), weights held as the checkpoint stores them and
    widened per op: the same arithmetic as converting them, at the memory of the checkpoint's dtype."""
    import torch

    from moerun.backends.base import get_backend_class

    if hp_dtype == "auto":
        dtype = torch.float64 if reference.dtype.itemsize >= 4 else torch.float32
    else:
        dtype = getattr(torch, hp_dtype)
    cpu = get_backend_class("cpu")
    block = reference.kv_block_size if reference.kv_block_size in cpu.capabilities.kv_block_sizes else None
    return dataclasses.replace(reference, backend="cpu", dtype=dtype, kv_block_size=block,
                               backend_options=cpu.validate_options({"weights": "checkpoint"}, "high-precision cpu"),
                               source=f"high-precision run of {reference.source}")


def _calibration(k, epsilon, top1_margin) -> Calibration:
    cal = Calibration(k=Calibration.k if k is None else k, epsilon=Calibration.epsilon if epsilon is None else epsilon,
                      top1_margin=top1_margin)
    if not (math.isfinite(cal.k) and cal.k >= 1):
        raise MoerunError(f"--k: must be a finite number >= 1, got {cal.k}")
    if not (math.isfinite(cal.epsilon) and cal.epsilon >= 0):
        raise MoerunError(f"--epsilon: must be a finite number >= 0, got {cal.epsilon}")
    if top1_margin is not None and not 0 <= top1_margin <= 1:
        raise MoerunError(f"--top1-margin: must be within 0..1, got {top1_margin}")
    return cal


def _sequences(token_ids, prompts, reference_folder: Path) -> list[list[int]]:
    if token_ids:
        return [parse_token_ids(t) for t in token_ids]
    from moerun.runtime.tokenizer import Tokenizer

    lines = [ln for ln in read_text(prompts, 16 * MiB, "prompts file", MoerunError).splitlines() if ln.strip()]
    if not lines:
        raise MoerunError(f"--prompts: {prompts} has no prompts")
    tokenizer = Tokenizer.from_folder(reference_folder)
    return [tokenizer.encode(ln) for ln in lines]


@dataclasses.dataclass
class RunOutput:
    logits: object  # fp32 [T, V] over all sequences
    stages: dict | None  # stage name -> tensor [T, ...], with --per-layer
    route: object  # (stage name, router logits) -> expert ids, with this run's correction biases


def _run(run, sequences, per_layer: bool, label: str) -> RunOutput:
    """Load one configuration, run every sequence through it, and let the engine go before returning."""
    import torch

    engine = load_engine(run, label=label)
    recorder = StageRecorder() if per_layer else None
    logits = torch.cat([engine.logits(s, recorder) for s in sequences])
    return RunOutput(logits, recorder.tensors() if recorder else None, stage_router(engine))


def _report_fixed(configs, outputs: list[RunOutput], t: Thresholds, per_layer: bool) -> None:
    ref, cand = outputs
    report = compare_logits(ref.logits, cand.logits, t)
    click.echo(f"A = {configs[0]}\nB = {configs[1]}\nverdict: fixed thresholds, B against A")
    if per_layer:
        common = {k: v for k, v in ref.stages.items() if k in cand.stages}
        diffs = compare_stages(common, cand.stages, ref.route)
        print_table(["stage", "max |A-B| / max|A|", "cosine", "expert agreement"],
                    [[d.name, f"{d.max_abs_rel:.3e}", f"{d.cosine:.6f}", _agreement(d.expert_agreement)] for d in diffs])
        click.echo()
    print_table(["metric", "value", "threshold"], [list(r) for r in report.rows(t)])
    _finish(report.passed, report.failures)


def _report_calibrated(configs, hp_run, outputs: list[RunOutput], cal: Calibration, per_layer: bool) -> None:
    hp, ref, cand = outputs
    verdict = calibrated_verdict(hp.logits, ref.logits, cand.logits, cal)
    click.echo(f"A  = {configs[0]}\nB  = {configs[1]}\n"
               f"HP = A's checkpoint on cpu in {hp_run.dtype_name}, weights as stored (the high-precision run)\n"
               f"verdict: calibrated, B against the floor A-vs-HP (k {cal.k:g}, epsilon {cal.epsilon:g}, "
               f"top-1 margin {cal.margin(verdict.floor):.4f})")
    if per_layer:
        floors = stage_floors(hp.stages, ref.stages, cand.stages, cal.k, hp.route)
        first = next((f for f in floors if f.left), None)
        click.echo("per stage: median over tokens of |x_t - HP_t| / |HP_t|; experts: agreement with HP's choices")
        print_table(["stage", "A vs HP", "B vs HP", "B limit", "A experts", "B experts", "note"],
                    [[f.name, f"{f.floor.token_rel:.3e}", f"{f.candidate.token_rel:.3e}", f"{f.limit:.3e}",
                      _agreement(f.floor.expert_agreement), _agreement(f.candidate.expert_agreement),
                      "<- leaves the floor" if f is first else ""] for f in floors])
        if first is None:
            click.echo("B stays within the floor at every stage")
        else:
            layer, _, op = first.name.partition(".")
            where = f"layer {layer.removeprefix('layer')}, {op}" if op else first.name
            click.echo(f"B leaves the floor first at {where} ({first.name})")
        click.echo()
    print_table(["metric (x against y)", "floor: A vs HP", "candidate: B vs HP", "limit", "B vs A"],
                [list(r) for r in verdict.rows()])
    _finish(verdict.passed, verdict.failures)


def _agreement(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _finish(passed: bool, failures: list[str]) -> None:
    click.echo("PASS" if passed else "FAIL: " + "; ".join(failures))
    if not passed:
        sys.exit(1)


class StageRecorder:
    """The `observe` hook of the graph: keeps each stage's tensors on the CPU, per sequence, at least fp32 (float64
    stays float64, so a high-precision run keeps its precision)."""

    def __init__(self) -> None:
        self.stages: dict[str, list] = {}

    def __call__(self, name, tensor) -> None:
        from moerun.backends.cpu.ops import wide

        self.stages.setdefault(name, []).append(tensor.detach().to(wide(tensor.dtype)).cpu())

    def tensors(self) -> dict:
        import torch

        return {k: torch.cat(v) for k, v in self.stages.items()}


def stage_router(engine):
    """Expert choices from recorded router logits, with the run's correction biases and top-k (copied out, so the
    function does not keep the engine alive)."""
    from moerun.backends.cpu.ops import route

    biases = {f"layer{i}.router_logits": layer.router_bias.detach().cpu().clone()
              for i, layer in enumerate(engine.model.weights.layers)}
    top_k = engine.config.top_k
    return lambda name, logits: route(logits, biases[name], top_k)[1]
