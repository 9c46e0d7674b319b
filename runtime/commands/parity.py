"""`moerun parity`: the same tokens through two configurations, compared (logits, and per layer on request)."""

from __future__ import annotations

import sys

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.commands.common import FiniteFloat, load_engine, parse_token_ids, print_table
from moerun.runtime.files import MiB, read_text
from moerun.runtime.limits import RequestLimits
from moerun.runtime.parity import Thresholds, compare_logits, compare_stages


@click.command()
@click.option("-c", "--config", "configs", multiple=True, required=True, help="Reference YAML, then candidate YAML.")
@click.option("--token-ids", default=None, help="Comma-separated token ids (one sequence).")
@click.option("--prompts", default=None,
              help="Text file, one prompt per line, tokenized with the reference's tokenizer.")
@click.option("--max-abs-rel", type=FiniteFloat(0.0), default=Thresholds.max_abs_rel,
              help="Max |A-B| / max|A| (default: off).")
@click.option("--mean-kl", type=FiniteFloat(0.0), default=Thresholds.mean_kl, show_default=True)
@click.option("--max-kl", type=FiniteFloat(0.0), default=Thresholds.max_kl, help="Max per-position KL (default: off).")
@click.option("--min-top1", type=FiniteFloat(0.0, 1.0), default=Thresholds.min_top1, show_default=True)
@click.option("--min-top5", type=FiniteFloat(0.0, 1.0), default=Thresholds.min_top5, show_default=True)
@click.option("--per-layer", is_flag=True, help="Also compare each layer's attention, router and MoE outputs.")
def parity(configs, token_ids, prompts, max_abs_rel, mean_kl, max_kl, min_top1, min_top5, per_layer):
    """Run the same tokens through two configurations and compare next-token distributions. Exit 1 if beyond."""
    import torch

    if len(configs) != 2:
        raise MoerunError(f"-c: parity takes exactly two configs (reference, candidate), got {len(configs)}")
    if (token_ids is None) == (prompts is None):
        raise MoerunError("give exactly one of --token-ids or --prompts")
    t = Thresholds(max_abs_rel=max_abs_rel, mean_kl=mean_kl, max_kl=max_kl, min_top1=min_top1, min_top5=min_top5)
    ref = load_engine(configs[0], label="loading reference")
    if token_ids is not None:
        sequences = [parse_token_ids(token_ids)]
    else:
        lines = [ln for ln in read_text(prompts, 16 * MiB, "prompts file", MoerunError).splitlines() if ln.strip()]
        if not lines:
            raise MoerunError(f"--prompts: {prompts} has no prompts")
        sequences = [ref.tokenizer.encode(ln) for ln in lines]
    limits = RequestLimits.of(ref.run, ref.config)
    for i, seq in enumerate(sequences):  # each runs alone, so each must fit on its own
        limits.check_lengths([len(seq)], f"sequence {i + 1} ({len(seq)} tokens)")
    ref_stages, cand_stages = StageRecorder(), StageRecorder()
    ref_logits = torch.cat([ref.logits(s, ref_stages if per_layer else None) for s in sequences])
    route = stage_router(ref)
    del ref
    cand = load_engine(configs[1], label="loading candidate")
    if cand.config.vocab_size != ref_logits.shape[-1]:
        raise MoerunError(f"the two configs have different vocabularies ({ref_logits.shape[-1]} vs {cand.config.vocab_size})")
    cand_logits = torch.cat([cand.logits(s, cand_stages if per_layer else None) for s in sequences])
    report = compare_logits(ref_logits, cand_logits, t)
    click.echo(f"A = {configs[0]}\nB = {configs[1]}")
    if per_layer:
        ref_t, cand_t = ref_stages.tensors(), cand_stages.tensors()
        common = {k: v for k, v in ref_t.items() if k in cand_t}
        diffs = compare_stages(common, {k: cand_t[k] for k in common}, route)
        print_table(["stage", "max |A-B| / max|A|", "cosine", "expert agreement"],
                    [[d.name, f"{d.max_abs_rel:.3e}", f"{d.cosine:.6f}",
                      "" if d.expert_agreement is None else f"{d.expert_agreement:.4f}"] for d in diffs])
        click.echo()
    print_table(["metric", "value", "threshold"], [list(r) for r in report.rows(t)])
    click.echo("PASS" if report.passed else "FAIL: " + "; ".join(report.failures))
    if not report.passed:
        sys.exit(1)


class StageRecorder:
    """The `observe` hook of the graph: keeps each stage's tensors (on the CPU, fp32), per sequence."""

    def __init__(self) -> None:
        self.stages: dict[str, list] = {}

    def __call__(self, name, tensor) -> None:
        self.stages.setdefault(name, []).append(tensor.detach().float().cpu())

    def tensors(self) -> dict:
        import torch

        return {k: torch.cat(v) for k, v in self.stages.items()}


def stage_router(engine):
    """Expert choices from recorded router logits, with the reference checkpoint's correction bias and top-k."""
    from moerun.backends.cpu.ops import route

    biases = {f"layer{i}.router_logits": layer.router_bias.cpu() for i, layer in enumerate(engine.model.weights.layers)}
    return lambda name, logits: route(logits, biases[name], engine.config.top_k)[1]
