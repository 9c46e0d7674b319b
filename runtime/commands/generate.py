"""`moerun generate`: one prompt through the chat template, sampled, its text printed as it is generated."""

from __future__ import annotations

import time

import click

from moerun.runtime.commands.common import load_engine

_FROM_CHECKPOINT = "default: the checkpoint's generation_config.json"


@click.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("-p", "--prompt", required=True, help="User message (rendered with the checkpoint's chat template).")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=None, help=f"0 = greedy ({_FROM_CHECKPOINT}).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, help=_FROM_CHECKPOINT + ".")
@click.option("--top-k", type=click.IntRange(0), default=None, help=f"0 = off ({_FROM_CHECKPOINT}).")
@click.option("--seed", type=click.IntRange(0, 2 ** 64 - 1), default=None, help="Reproduce a sampled run (default: random).")
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
def generate(config, prompt, max_tokens, temperature, top_p, top_k, seed, raw):
    """Generate a completion for one prompt."""
    from moerun.runtime.sampling_params import SamplingParams

    engine = load_engine(config)
    tok = engine.tokenizer
    text = prompt if raw else tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(text)
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
