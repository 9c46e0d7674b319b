"""`moerun generate`: one prompt through the chat template, sampled, its text printed as it is generated."""

from __future__ import annotations

import time

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.commands.common import MAX_SEED, FiniteFloat, load_engine, load_target

# Below this a temperature divides logits into infinities; 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-5

_FROM_CHECKPOINT = "default: the checkpoint's generation_config.json"


@click.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("-p", "--prompt", required=True, help="User message (rendered with the checkpoint's chat template).")
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="M2 models reason before they answer: leave room for both.")
@click.option("--temperature", type=FiniteFloat(0.0, 1e4), default=None,
              help=f"0 = greedy, else {MIN_TEMPERATURE:g}..1e4 ({_FROM_CHECKPOINT}).")
@click.option("--top-p", type=FiniteFloat(0.0, 1.0, min_open=True), default=None, help=_FROM_CHECKPOINT + ".")
@click.option("--top-k", type=click.IntRange(0), default=None, help=f"0 = off ({_FROM_CHECKPOINT}).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Reproduce a sampled run (default: random).")
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
def generate(config, prompt, max_tokens, temperature, top_p, top_k, seed, raw):
    """Generate a completion for one prompt."""
    from moerun.runtime.sampling_params import SamplingParams
    from moerun.runtime.tokenizer import Tokenizer

    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise MoerunError(f"--temperature: {temperature:g} is too small (allowed: 0 for greedy, or "
                          f"{MIN_TEMPERATURE:g}..1e4)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise MoerunError(f"-p: not valid UTF-8 text (character {e.start})") from None
    target = load_target(config)
    tok = Tokenizer.from_folder(target.folder)
    text = prompt if raw else tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(text)
    if not ids:
        raise MoerunError("-p: the prompt is empty (give some text)" if raw else
                          f"{tok.template_source}: the chat template rendered an empty prompt")
    target.limits.check_lengths([len(ids) + max_tokens], f"the prompt ({len(ids)} tokens) plus --max-tokens {max_tokens}")
    engine = load_engine(target)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    t0 = time.perf_counter()
    engine.add_request("generate", ids, params)
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            click.echo(out.new_text, nl=False)
            generated = len(out.output_token_ids)
    click.echo()
    seconds = time.perf_counter() - t0
    click.echo(f"[{len(ids)} prompt tokens, {generated} generated in {seconds:.2f}s on {engine.backend.describe()}]",
               err=True)
