"""The engine as a server drives it: many requests at once, chunked and mixed steps, preemption, prefix caching,
seeds, prompt logprobs and the refusals. The reference for a request's output is the same request served alone
(whose logits tests/test_hf_parity.py and tests/test_decode.py check against transformers and full prefill)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import run_yaml

from moerun.backends.errors import ConfigError
from moerun.runtime.engine import Engine
from moerun.runtime.sampling_params import RequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def engine_for(folder, write_yaml, name="run.yaml", num_blocks=128, **scheduler) -> Engine:
    data = run_yaml(folder, scheduler=scheduler)
    data["kv_cache"]["num_blocks"] = num_blocks
    return Engine.from_config(write_yaml(data, name))


def random_prompts(n: int, seed: int, vocab: int = 211) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (35,), generator=gen).tolist()  # some prompts share a 2-block prefix
    prompts = []
    for i in range(n):
        tail = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append(shared[:33] + tail if i % 4 == 0 else tail)
    return prompts


def test_64_concurrent_requests_each_equal_the_request_served_alone(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    prompts = random_prompts(64, seed=1)
    # 64 in flight, steps of at most 100 tokens: decodes mixed with chunks of other prompts
    busy = engine_for(folder, write_yaml, "busy.yaml", max_num_seqs=64, max_num_batched_tokens=100)
    together = busy.generate(prompts, GREEDY)
    alone = engine_for(folder, write_yaml, "alone.yaml", enable_prefix_caching=False)
    for prompt, out in zip(prompts, together):
        assert out.output_token_ids == alone.generate([prompt], GREEDY)[0].output_token_ids
        assert out.finish_reason == "length" and len(out.output_token_ids) == 6
    stats = busy.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.prefix_cache_hits > 0  # the shared prefixes were reused


def test_preemption_with_a_tiny_cache_leaves_outputs_unchanged(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    prompts = random_prompts(8, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=24, ignore_eos=True) for i in range(8)]
    roomy = engine_for(folder, write_yaml, "roomy.yaml").generate(prompts, params)
    tiny = engine_for(folder, write_yaml, "tiny.yaml", num_blocks=6)
    cramped = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions > 0
    assert [o.output_token_ids for o in cramped] == [o.output_token_ids for o in roomy]
    assert tiny.stats().kv_blocks_used == 0


def test_a_prefix_cache_hit_gives_the_logits_of_a_miss(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    shared = random_prompts(1, seed=3)[0][:33]
    first, second = shared + [5, 6], shared + [7]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=20)
    cached = engine_for(folder, write_yaml, "cached.yaml")
    cached.generate([first], params)
    hit = cached.generate([second], params)[0]
    assert hit.num_cached_tokens == 32  # two full blocks of 16
    miss = engine_for(folder, write_yaml, "cold.yaml", enable_prefix_caching=False).generate([second], params)[0]
    assert miss.num_cached_tokens == 0 and hit.output_token_ids == miss.output_token_ids
    final_hit, final_miss = hit.new_logprobs[-1], miss.new_logprobs[-1]
    assert max(abs(a - b) for (_, a), (_, b) in zip(final_hit.top, final_miss.top)) <= 1e-5


def test_chunked_prefill_equals_whole_prefill(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa6_quarter_rope", torch.float32)
    tokens = random_prompts(1, seed=4)[0] * 3
    whole = engine_for(folder, write_yaml, "whole.yaml").logits(tokens)
    chunked = engine_for(folder, write_yaml, "chunked.yaml", max_num_batched_tokens=7).logits(tokens)
    assert whole.shape == chunked.shape == (len(tokens), 211)
    assert (whole - chunked).abs().max() <= 1e-5 * whole.abs().max()


def test_prompt_logprobs_are_log_softmax_of_the_teacher_forced_logits(hf_checkpoint, write_yaml):
    """echo-style: max_tokens 0 returns the prompt's logprobs only; prefilled in chunks of 5."""
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = engine_for(folder, write_yaml, max_num_batched_tokens=5)
    prompt = random_prompts(3, seed=5)[1] + [3, 4, 5]
    reference = engine.logits(prompt).double().log_softmax(-1)
    out = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=3))[0]
    assert out.output_token_ids == [] and out.finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == prompt[position + 1]
        assert abs(entry.logprob - reference[position, entry.token_id].item()) <= 1e-5
        assert [t for t, _ in entry.top] == reference[position].topk(3).indices.tolist()


def test_seeded_requests_repeat_whatever_else_is_in_flight(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = engine_for(folder, write_yaml, max_num_batched_tokens=16)
    prompt = [4, 8, 15, 16, 23, 42]
    mine = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = engine.generate([prompt], mine)[0].output_token_ids
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=9, ignore_eos=True) for s in range(3)]
    crowd = engine.generate([[1, 2, 3] * 9, prompt, [9] * 20, [5, 6]], [others[0], mine, others[1], others[2]])
    assert crowd[1].output_token_ids == alone
    assert engine.generate([prompt], SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True))[0] \
        .output_token_ids != alone  # the seed matters


def test_requests_the_engine_can_never_serve_are_refused_with_one_line(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = engine_for(folder, write_yaml, num_blocks=8, max_model_len=100)
    cases = [
        (list(range(90)), SamplingParams(max_tokens=20), re.escape(
            "This model's maximum context length is 100 tokens. However, you requested 110 tokens (90 in the messages, "
            "20 in the completion). Please reduce the length of the messages or completion.")),
        ([1] * 100, SamplingParams(), "maximum context length is 100 tokens. However, you requested 101 tokens"),
        ([1, 211], SamplingParams(), "token id 211 at position 1 is outside the vocabulary"),
        ([], SamplingParams(), "the prompt has no tokens"),
        ([1], SamplingParams(temperature=float("nan")), "temperature: nan is not allowed"),
        ([1], SamplingParams(top_p=0.0), r"top_p: 0.0 is not allowed \(a number in \(0.0, 1.0\]\)"),
        ([1], SamplingParams(logprobs=21), "logprobs: 21 is not allowed"),
        ([1], SamplingParams(seed=2 ** 64), "seed: .* is not allowed"),
        ([1], SamplingParams(stop=("x",)), "stop strings need a tokenizer"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError, match=message) as err:
            engine.add_request("bad", prompt, params)
        assert "\n" not in str(err.value)
    assert not engine.has_unfinished_requests()
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [3], SamplingParams())
    with pytest.raises(ConfigError, match="scheduler.max_model_len: 4096 is more than the model's max_position_embeddings 512"):
        engine_for(folder, write_yaml, "long.yaml", max_model_len=4096)
    with pytest.raises(ConfigError, match=r"scheduler.max_model_len: 200 tokens do not fit the KV cache \(128 tokens"):
        engine_for(folder, write_yaml, "small.yaml", num_blocks=8, max_model_len=200)


def test_abort_frees_the_blocks_at_once(hf_checkpoint, write_yaml):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    engine = engine_for(folder, write_yaml)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=50))
    engine.add_request("b", list(range(20)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().kv_blocks_used == 3 + 2
    engine.abort_request("a")
    assert engine.stats().kv_blocks_used == 2 and engine.stats().num_running == 1
    engine.abort_request("b")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished_requests()


def test_sampling_defaults_come_from_generation_config(hf_checkpoint, write_yaml, tmp_path):
    folder, _ = hf_checkpoint("gqa4_half_rope", torch.float32)
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 7, "top_p": 0.8}))
    engine = engine_for(copy, write_yaml)
    defaults = engine.generation_defaults
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p) == (0.6, 0.8, 7, 0.0)
    params = SamplingParams(top_k=3).with_defaults(defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.8, 3)  # the caller's value wins
