"""Text out of the engine, on the demo checkpoint's byte-level BPE tokenizer: the incremental detokenizer against a
full decode (multi-byte characters split over tokens), stop strings across token boundaries, stop token ids."""

from __future__ import annotations

import pytest
from conftest import make_request

from moerun.runtime.detokenizer import IncrementalDetokenizer
from moerun.runtime.engine import Engine
from moerun.runtime.request import RequestStatus
from moerun.runtime.sampling_params import SamplingParams
from moerun.runtime.stopping import append_token, text_to_report
from moerun.runtime.tokenizer import Tokenizer

TEXT = "plain ascii, 汉字と日本語, emoji 🙂👍🏽 and é ü ß, then <think>why</think> ok"


@pytest.fixture(scope="module")
def tokenizer(demo_folder) -> Tokenizer:
    return Tokenizer.from_folder(demo_folder)


@pytest.fixture(scope="module")
def engine(demo_folder, tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("demo_yaml") / "demo.yaml"
    path.write_text(f"backend: cpu\nmodel: {{path: '{demo_folder}', dtype: float32}}\nkv_cache: {{num_blocks: 64}}\n")
    return Engine.from_config(path)


def test_incremental_text_equals_the_full_decode_and_never_shows_a_fragment(tokenizer):
    ids = tokenizer.encode(TEXT)
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert split, "the text should put multi-byte characters across several tokens"
    for prompt in ([], tokenizer.encode("前文")):  # with and without prompt context before the output
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detok.add([i]) for i in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == tokenizer.decode(ids) == TEXT
        assert not any("\ufffd" in d for d in deltas)


def test_an_unfinished_character_at_the_end_is_flushed_as_the_full_decode_has_it(tokenizer):
    ids = tokenizer.encode("ok 🙂")
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add([i]) for i in ids[:cut])
    assert text + detok.flush() == tokenizer.decode(ids[:cut])


def feed(tokenizer, ids, params, stop_ids=()):
    """Drive stopping.append_token as the engine does; the reported text pieces and the finish reason."""
    request = make_request(params, prompt=[1], stop=stop_ids, max_tokens=len(ids))
    request.detokenizer = IncrementalDetokenizer(tokenizer, [1], params.skip_special_tokens)
    pieces, reason = [], None
    for token in ids:
        reason = append_token(request, token)
        if reason:
            request.status = RequestStatus.FINISHED
        pieces.append(text_to_report(request))
        if reason:
            break
    return request, pieces, reason


def test_stop_strings_across_token_boundaries_are_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode(TEXT)
    for stop in ("本語, em", "🙂👍", "</think> o", "ascii"):
        request, pieces, reason = feed(tokenizer, ids, SamplingParams(stop=("never there", stop)))
        assert reason == "stop" and request.stop_reason == stop
        assert request.output_text == TEXT[:TEXT.index(stop)] == "".join(pieces)
        kept, _, _ = feed(tokenizer, ids, SamplingParams(stop=(stop,), include_stop_str_in_output=True))
        assert kept.output_text == TEXT[:TEXT.index(stop) + len(stop)]


def test_stop_token_ends_without_its_text_and_min_tokens_defers_stops(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop_token = ids[5]
    request, pieces, reason = feed(tokenizer, ids, SamplingParams(), stop_ids={stop_token})
    assert reason == "stop" and request.stop_reason == stop_token
    assert request.output_token_ids == ids[:6] and request.output_text == tokenizer.decode(ids[:5]) == "".join(pieces)
    late, _, _ = feed(tokenizer, ids, SamplingParams(min_tokens=6), stop_ids={stop_token})
    assert late.output_token_ids == ids[:len(late.output_token_ids)] and len(late.output_token_ids) > 6
    length, _, reason = feed(tokenizer, ids[:4], SamplingParams())
    assert reason == "length" and length.output_text == tokenizer.decode(ids[:4])


def test_engine_streams_text_that_adds_up_and_honours_stops(engine):
    tok = engine.tokenizer
    assert (engine.generation_defaults.temperature, engine.generation_defaults.top_p,
            engine.generation_defaults.top_k) == (1.0, 0.95, 40)  # the demo's generation_config.json (as M2's)
    assert engine.sample_vocab_size == tok.vocab_size < engine.config.vocab_size  # padded vocab masked
    prompt = tok.encode("hello")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    text = free.output_text
    assert text == tok.decode(free.output_token_ids) and len(text) > 6
    stop = text[3:6]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=(stop,)))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert "".join(pieces) == final.output_text == text[:text.index(stop)]
    token = free.output_token_ids[4]
    by_id = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(token,)))[0]
    cut = free.output_token_ids.index(token) + 1
    assert by_id.output_token_ids == free.output_token_ids[:cut] and by_id.stop_reason == token
