"""The `moerun` command line: generate, logits, smoke, parity, bench.

Bad input (a missing checkpoint, a YAML typo, a token id outside the vocabulary, ...) is one line on stderr and
exit code 2; `--debug` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import click
import numpy as np

from moerun.runtime.errors import MoerunError
from moerun.runtime.parity import Thresholds, compare_logits, compare_stages
from moerun.runtime.run_config import RunConfig, load_run_config
from moerun.runtime.table import format_table

EXIT_BAD_INPUT = 2


def demo_config_path() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo.yaml"))


def load_engine(config: str | None, num_layers: int | None = None, label: str = "loading"):
    """Build the engine for a YAML file (the embedded demo when None), with a progress bar over layers."""
    from moerun.runtime.engine import Engine

    run: RunConfig = load_run_config(config or demo_config_path())
    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label=f"{label} {run.backend}", file=sys.stderr))
            bar.update(1)

        return Engine(run, num_layers=num_layers, progress=progress)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise MoerunError(f"--token-ids: expected comma-separated integers like 1,5,9, got {text!r}") from None
    if not ids:
        raise MoerunError("--token-ids: no token ids given")
    return ids


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    click.echo(format_table(headers, rows))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """moerun: MiniMax-M2-family MoE inference on CPU, NVIDIA (cuda) and Ascend (ascend) backends.

    Add --debug anywhere to see tracebacks."""


@cli.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("-p", "--prompt", required=True, help="User message (rendered with the checkpoint's chat template).")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
def generate(config, prompt, max_tokens, temperature, top_p, top_k, seed, raw):
    """Generate a completion for one prompt."""
    from moerun.runtime.sampling import SamplingParams

    engine = load_engine(config)
    tok = engine.tokenizer
    text = prompt if raw else tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(text)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens)
    t0 = time.perf_counter()
    out = engine.generate([ids], params, seed=seed, stop_ids=tuple(tok.eos_token_ids))[0]
    seconds = time.perf_counter() - t0
    click.echo(tok.decode(out))
    click.echo(f"[{len(ids)} prompt tokens, {len(out)} generated in {seconds:.2f}s on {engine.backend.describe()}]",
               err=True)


@cli.command()
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


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    """Never leave a half-written file at `path`: write beside it, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cli.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("--layers", type=click.IntRange(1), default=None, help="Load only the first N decoder layers.")
@click.option("--steps", type=click.IntRange(1), default=8, show_default=True, help="Decode steps.")
def smoke(config, layers, steps):
    """Load, prefill a ragged batch, decode; check finiteness, decode == prefill, determinism. Exit 0 iff all pass."""
    from moerun.runtime.smoke import Check, run_smoke

    t0 = time.perf_counter()
    engine = load_engine(config, num_layers=layers)
    load = Check("load", True, f"{engine.model.num_layers}/{engine.config.num_layers} layers, {engine.backend.describe()}",
                 time.perf_counter() - t0)
    checks = [load, *run_smoke(engine, steps=steps)]
    print_table(["check", "result", "seconds", "detail"],
                [[c.name, "pass" if c.passed else "FAIL", f"{c.seconds:.3f}", c.detail] for c in checks])
    if not all(c.passed for c in checks):
        sys.exit(1)


@cli.command()
@click.option("-c", "--config", "configs", multiple=True, required=True, help="Reference YAML, then candidate YAML.")
@click.option("--token-ids", default=None, help="Comma-separated token ids (one sequence).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file, one prompt per line, tokenized with the reference's tokenizer.")
@click.option("--max-abs-rel", type=float, default=Thresholds.max_abs_rel, help="Max |A-B| / max|A| (default: off).")
@click.option("--mean-kl", type=float, default=Thresholds.mean_kl, show_default=True)
@click.option("--max-kl", type=float, default=Thresholds.max_kl, help="Max per-position KL (default: off).")
@click.option("--min-top1", type=float, default=Thresholds.min_top1, show_default=True)
@click.option("--min-top5", type=float, default=Thresholds.min_top5, show_default=True)
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
        lines = [ln for ln in Path(prompts).read_text().splitlines() if ln.strip()]
        if not lines:
            raise MoerunError(f"--prompts: {prompts} has no prompts")
        sequences = [ref.tokenizer.encode(ln) for ln in lines]
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


def _add_bench() -> None:
    from moerun.runtime.bench import bench

    cli.add_command(bench)


_add_bench()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = cli.main(args=argv, prog_name="moerun", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:  # usage errors: one line, exit 2
        if debug:
            raise
        click.echo(f"moerun: error: {e.format_message()}", err=True)
        return EXIT_BAD_INPUT if isinstance(e, click.UsageError) else e.exit_code
    except MoerunError as e:
        if debug:
            raise
        click.echo(f"moerun: error: {e}", err=True)
        return EXIT_BAD_INPUT
    except click.Abort:
        click.echo("moerun: aborted", err=True)
        return 130



def console_main() -> None:
    sys.exit(main())
