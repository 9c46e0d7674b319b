"""`moerun generate`: one prompt through the chat template, sampled, printed."""

from __future__ import annotations

import time

import click

from moerun.runtime.commands.common import load_engine


@click.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("-p", "--prompt", required=True, help="User message (rendered with the checkpoint's chat template).")
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="M2 models reason before they answer: leave room for both.")
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
