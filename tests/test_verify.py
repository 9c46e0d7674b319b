"""`moerun verify` against moerun's own server on small transformers-saved checkpoints, the real engine behind it:
every faithful configuration passes every check over two checkpoint seeds (a manifest from a float32 reference
with its default bfloat16 floor), and each deliberately degraded server fails the check that names its cause and
only that one: weights fake-quantized to 4 and 8 bits, one layer perturbed by 1% noise and a checkpoint of another
seed fail logprob fidelity; templates that sort tool-schema keys, drop the system prompt or add a second BOS fail
the template counts, naming the first case that differs. Without echo the chat path still tells them apart.
Every server is moerun's app on a loopback port, verify the real command run in-process.

The tool-calling and reasoning checks see no tool calls from random weights (the references make none either):
the trained demo model, which does call tools, shows them judging real calls at the end, and
tests/test_verify_scripted.py exercises each of their failures on a scripted model."""

from __future__ import annotations

from pathlib import Path

import pytest

from verify_servers import (WEIGHT_CHANGES, calls_left_in_content, chat_checkpoint, degraded_copy, engine_for,
                            run_verify, served, write_manifest)

SHAPE = "gqa4_half_rope"
SEEDS = (0, 1)
FAITHFUL = [("cpu", "float32"), ("cpu", "bfloat16"), ("ascend", "bfloat16")]
ALL_PASS = {"logprobs": "PASS", "template": "PASS", "tools": "PASS", "reasoning": "PASS"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def checkpoint(root):
    """checkpoint(seed) -> a bf16 chat checkpoint, built once."""
    made = {}

    def make(seed: int) -> Path:
        if seed not in made:
            made[seed] = chat_checkpoint(SHAPE, root / f"seed{seed}", seed)
        return made[seed]
    return make


@pytest.fixture(scope="module")
def manifest(root, checkpoint):
    """manifest(seed) -> the checkpoint's manifest: probes from cpu float32, the floor from cpu bfloat16."""
    made = {}

    def make(seed: int) -> Path:
        if seed not in made:
            made[seed] = write_manifest(checkpoint(seed), root / f"manifest{seed}.json", probe_tokens=4,
                                        answer_tokens=4)
        return made[seed]
    return make


@pytest.fixture(scope="module")
def degraded(root, checkpoint):
    """degraded(change) -> a copy of the seed-0 checkpoint with that change, built once."""
    def make(change: str) -> Path:
        folder = root / change
        return folder if folder.exists() else degraded_copy(checkpoint(0), folder, change, SHAPE, seed=0)
    return make


def verdicts(report: dict) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in report["checks"]}


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend,dtype", FAITHFUL)
def test_faithful_configurations_pass_every_check(seed, backend, dtype, checkpoint, manifest, tmp_path):
    with served(engine_for(checkpoint(seed), backend, dtype)) as url:
        code, report, table = run_verify(url, manifest(seed), tmp_path / "r.json")
    assert (code, verdicts(report)) == (0, ALL_PASS), table
    logprobs = check(report, "logprobs")["figures"]
    assert logprobs["path"] == "echo" and logprobs["k"] == 20 and logprobs["positions"] > 1500
    if backend == "cpu" and dtype == "float32":  # the reference's own configuration: the same numbers
        assert logprobs["endpoint_median_kl"] < 1e-9 and logprobs["endpoint_top1"] == 1.0
    assert table.splitlines()[-1] == "PASS"
    assert report["manifest_digest"].startswith("sha256:") and report["floor"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", WEIGHT_CHANGES)
def test_degraded_weights_fail_logprob_fidelity_only(name, degraded, manifest, tmp_path):
    with served(engine_for(degraded(name))) as url:
        code, report, table = run_verify(url, manifest(0), tmp_path / "r.json")
    assert (code, verdicts(report)) == (1, {**ALL_PASS, "logprobs": "FAIL"}), table
    figures = check(report, "logprobs")["figures"]
    assert (float(figures["endpoint_median_kl"]) > figures["kl_limit"]
            or figures["endpoint_top1"] < figures["top1_limit"])
    assert table.splitlines()[-1] == "FAIL: logprob fidelity"


@pytest.mark.parametrize("name,first", [
    ("sorted-tool-keys", "first case that differs: tool-schemas"),
    ("no-system-prompt", "first case that differs: system-prompt"),
    ("second-bos", "every case has +1 token"),
])
def test_degraded_templates_fail_template_counts_only(name, first, degraded, manifest, tmp_path):
    """Logprob fidelity is left out here: its echo path sends the reference's token ids, which no template
    touches (the faithful runs above show it passing on this very checkpoint)."""
    with served(engine_for(degraded(name))) as url:
        code, report, table = run_verify(url, manifest(0), tmp_path / "r.json", "--checks", "template,tools,reasoning")
    assert (code, verdicts(report)) == (1, {"template": "FAIL", "tools": "PASS", "reasoning": "PASS"}), table
    assert check(report, "template")["failures"][0].startswith(first)


@pytest.mark.parametrize("name,verdict", [(None, "PASS"), ("q4", "FAIL")])
def test_without_echo_the_chat_path_judges(name, verdict, checkpoint, degraded, manifest, tmp_path):
    folder = checkpoint(0) if name is None else degraded(name)
    with served(engine_for(folder), refuse_echo=True) as url:
        code, report, table = run_verify(url, manifest(0), tmp_path / "r.json", "--checks", "logprobs")
    result = check(report, "logprobs")
    assert (result["verdict"], result["figures"]["path"]) == (verdict, "chat"), table
    assert 12 <= result["figures"]["positions"] <= 12 * 5  # the continuation rows (4 tokens and the next)


@pytest.fixture(scope="module")
def demo_manifest(root) -> Path:
    """The trained demo's manifest, with answers long enough for its reasoning and calls."""
    from moerun.runtime.trained_demo import trained_demo_folder

    return write_manifest(trained_demo_folder(), root / "trained_demo.json", probe_tokens=1, answer_tokens=128)


@pytest.mark.parametrize("server,verdict", [({}, "PASS"), ({"rewrite": calls_left_in_content}, "FAIL")],
                         ids=["faithful", "calls left in the content"])
def test_on_the_trained_demo_the_answer_checks_judge_real_calls(server, verdict, demo_manifest, tmp_path):
    """The trained demo reasons, then answers or calls tools: its reference answers hold parallel get_weather calls,
    which a faithful bfloat16 server makes too and a server without M2's tool-call parser leaves in the content."""
    from moerun.runtime.trained_demo import trained_demo_folder

    with served(engine_for(trained_demo_folder()), **server) as url:
        code, report, table = run_verify(url, demo_manifest, tmp_path / "r.json", "--checks", "tools,reasoning")
    tools = check(report, "tools")
    assert tools["figures"]["reference_triggered"] >= 1 and check(report, "reasoning")["verdict"] == "PASS", table
    assert tools["verdict"] == verdict and code == (verdict == "FAIL"), table
