"""Reference probes for a fingerprint manifest: for each case of the probe set, the prompt the checkpoint's own chat
template renders, the greedy continuation, and the top-20 logprobs at every position of prompt + continuation
(teacher-forced), from one named trusted configuration whose provenance is recorded with them; and the floor: the
top-20 logprobs of a second faithful configuration on the same tokens, so `moerun verify` can judge an endpoint's
distance to the reference against the distance faithful arithmetic already puts between two configurations."""

from __future__ import annotations

import importlib.metadata

import torch

from moerun.runtime.probe_set import PROBE_SET_VERSION, PROBES
from moerun.runtime.sampling_params import SamplingParams

PROBE_TOKENS = 16  # greedy tokens per probe
TOP_LOGPROBS = 20  # what OpenAI-compatible servers return at most (top_logprobs <= 20)


def run_probe(engine, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The only engine calls of probing, kept together: the greedy continuation (stop tokens excluded), then the
    teacher-forced logits [T, V] of prompt + continuation."""
    [output] = engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0))
    continuation = list(output.output_token_ids)
    if isinstance(output.stop_reason, int):
        continuation.pop()  # the stop token itself
    return continuation, engine.logits(prompt_ids + continuation)


def top_logprobs(engine, logits: torch.Tensor) -> dict:
    """The TOP_LOGPROBS most likely next tokens at each row, over the ids a server can return (the tokenizer's
    vocabulary: a padded vocab_size has ids no server reports), rounded to 1e-6."""
    logits = logits[:, :engine.sample_vocab_size]
    top = torch.log_softmax(logits.double(), -1).topk(min(TOP_LOGPROBS, logits.shape[-1]), dim=-1)
    return {"top_ids": top.indices.tolist(),
            "top_logprobs": [[round(v, 6) for v in row] for row in top.values.tolist()]}


def record_probes(engine, config_source: str, max_new_tokens: int = PROBE_TOKENS) -> dict:
    cases = []
    for probe in PROBES:
        text = engine.tokenizer.apply_chat_template(probe["messages"], tools=probe.get("tools"))
        prompt_ids = engine.tokenizer.encode(text)
        continuation, logits = run_probe(engine, prompt_ids, max_new_tokens)
        cases.append({
            **probe,
            "prompt_ids": prompt_ids,
            "greedy_ids": continuation,
            "finish": "length" if len(continuation) == max_new_tokens else "stop",
            # Row i is the distribution after token i of prompt + continuation, i.e. the prediction of token i + 1.
            **top_logprobs(engine, logits),
        })
    return {
        "probe_set": PROBE_SET_VERSION,
        "configuration": describe_configuration(engine, config_source),
        "max_new_tokens": max_new_tokens,
        "top_logprobs": TOP_LOGPROBS,
        "cases": cases,
    }


def record_floor(engine, config_source: str, cases: list[dict]) -> dict:
    """A second faithful configuration teacher-forced on each case's reference tokens (prompt + the reference's
    greedy continuation), so its rows line up with the reference's."""
    return {
        "configuration": describe_configuration(engine, config_source),
        "cases": [{"name": case["name"], **top_logprobs(engine, engine.logits(case["prompt_ids"] + case["greedy_ids"]))}
                  for case in cases],
    }


def describe_configuration(engine, config_source: str) -> dict:
    run = engine.run
    return {
        "source": config_source, "backend": run.backend, "dtype": run.dtype_name,
        "backend_options": run.backend_options, "num_layers": run.num_layers, "device": engine.backend.describe(),
        "moerun": package_version("moerun"), "torch": torch.__version__,
    }


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
