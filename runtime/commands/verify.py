"""`moerun verify`: check an OpenAI-compatible endpoint against a fingerprint manifest's reference probes (logprob
fidelity, template token counts, tool calling, reasoning); one table, a verdict per check, optional JSON."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from moerun.backends.errors import MoerunError
from moerun.runtime.commands.common import FiniteFloat, check_output_path, write_atomically
from moerun.runtime.verify.endpoint import TIMEOUT_S
from moerun.runtime.verify.report import CHECKS


def _checks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise MoerunError(f"--checks: {', '.join(unknown) or 'none given'} (allowed: a comma-separated subset of "
                          f"{','.join(CHECKS)})")
    return names


@click.command()
@click.option("--endpoint", required=True, help="Base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1.")
@click.option("--api-key", envvar="MOERUN_API_KEY", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--model", required=True, help="The model name the endpoint serves.")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False),
              help="A manifest written by moerun fingerprint --probes-config.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON here too.")
@click.option("--checks", default=",".join(CHECKS), show_default=True, help="Which checks to run.")
@click.option("--k", type=FiniteFloat(min=1), default=None,
              help="Logprob fidelity: the endpoint's median KL may be k x the floor's [default: 2].")
@click.option("--timeout", type=FiniteFloat(min=1), default=TIMEOUT_S, show_default=True,
              help="Seconds one request may take (each check stops at its first request without an answer).")
@click.option("--strict", is_flag=True, help="A check that was not possible counts as failed.")
def verify(endpoint, api_key, model, manifest, out, checks, k, timeout, strict):
    """Check ENDPOINT against MANIFEST: exit 0 when no check fails, 1 when one does.

    moerun verify --endpoint http://host:8000/v1 --model NAME --manifest manifest.json [--out report.json]"""
    import dataclasses

    from moerun.runtime.probes import package_version
    from moerun.runtime.verify import report
    from moerun.runtime.verify.endpoint import Endpoint
    from moerun.runtime.verify.logprobs import CALIBRATION
    from moerun.runtime.verify.manifest import load_manifest

    names = _checks(checks)
    out_path = check_output_path(out) if out else None
    loaded = load_manifest(Path(manifest))
    cal = CALIBRATION if k is None else dataclasses.replace(CALIBRATION, k=k)
    client = Endpoint(endpoint, model, api_key, timeout)
    try:
        client.check_model()
        results = run_checks(client, loaded, names, cal)
    finally:
        client.close()
    click.echo(report.table(results))
    click.echo(report.verdict_line(results, strict))
    if out_path is not None:
        context = {"endpoint": endpoint, "model": model, "manifest": str(manifest), "manifest_digest": loaded.digest,
                   "probe_set": loaded.probe_set, "reference": loaded.configuration,
                   "floor": loaded.floor_configuration, "moerun": package_version("moerun"),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        body = json.dumps(report.report_json(results, context, strict), ensure_ascii=False, indent=1) + "\n"
        write_atomically(out_path, lambda f: f.write(body.encode()))
    return report.exit_code(results, strict)


def run_checks(endpoint, manifest, names: list[str], cal) -> list:
    from moerun.runtime.verify.answers import ask_answers
    from moerun.runtime.verify.logprobs import check_logprobs
    from moerun.runtime.verify.reasoning import check_reasoning
    from moerun.runtime.verify.template import check_template
    from moerun.runtime.verify.tools import check_tools

    results = []
    if "logprobs" in names:
        results.append(check_logprobs(endpoint, manifest, cal))
    if "template" in names:
        results.append(check_template(endpoint, manifest))
    if "tools" in names or "reasoning" in names:
        answers = ask_answers(endpoint, manifest)
        results += [check(answers) for name, check in (("tools", check_tools), ("reasoning", check_reasoning))
                    if name in names]
    return results
