"""The demo path a new user takes: no config, no download; the embedded default is the trained demo shipped in
the package (docs/demo.md), so what it prints is English."""

from __future__ import annotations

import pytest

from demo_english import is_sentence, known_share
from moerun.runtime.cli import main


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("MOERUN_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.mark.parametrize("prompt", ["What is the weather in Paris?", "hello"])
def test_generate_prints_english_with_no_config(prompt, demo_cache, capsys):
    """The README's first command, sampled as the checkpoint's generation_config.json says (seeded here)."""
    assert main(["generate", "-p", prompt, "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    reasoning, answer = out.split("</think>")  # the template opens the turn with <think>: reasoning comes first
    assert known_share(reasoning) >= 0.9 and is_sentence(answer), out
    assert "generated" in err
    assert not any(demo_cache.iterdir())  # nothing built into the cache, nothing fetched


def test_generate_is_reproducible_with_a_seed(demo_cache, capsys):
    runs = []
    for _ in range(2):
        assert main(["generate", "-p", "hello", "--max-tokens", "8", "--temperature", "0.8", "--seed", "7"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]


def test_smoke_passes_on_the_demo(demo_cache, capsys):
    assert main(["smoke"]) == 0
    assert not any(demo_cache.iterdir())
    out = capsys.readouterr().out
    for check in ("load", "prefill finite", "decode finite", "decode == prefill", "deterministic"):
        assert any(line.startswith(check) and " pass " in line for line in out.splitlines()), out


def test_smoke_with_a_layer_cut(demo_cache, capsys):
    assert main(["smoke", "--layers", "1", "--steps", "2"]) == 0
    assert "1/4 layers" in capsys.readouterr().out


def test_parity_fails_with_exit_1_when_models_differ(demo_cache, tmp_path, capsys):
    """Same checkpoint with 1 vs all layers: a different model, which parity must flag."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32}\n")
    b.write_text("backend: cpu\nmodel: {path: 'builtin:demo', dtype: float32, num_layers: 1}\n")
    assert main(["parity", "-c", str(a), "-c", str(a), "--token-ids", "5,6,7,8,9"]) == 0
    assert main(["parity", "-c", str(a), "-c", str(b), "--token-ids", "5,6,7,8,9"]) == 1
    assert "FAIL" in capsys.readouterr().out
