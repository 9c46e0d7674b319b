"""Template token counts: each template case of the manifest sent as a chat request (one token asked for), its
usage.prompt_tokens against the count the checkpoint's own template and tokenizer give (recorded in the manifest).
A deployment with another template or tokenizer (tool-schema keys sorted, the system prompt dropped, a second BOS)
renders some case to another number of tokens; the cases are ordered so the first that differs names the part."""

from __future__ import annotations

from moerun.runtime.verify.endpoint import Endpoint, Unanswered
from moerun.runtime.verify.manifest import VerifyManifest
from moerun.runtime.verify.report import CheckResult


def check_template(endpoint: Endpoint, manifest: VerifyManifest) -> CheckResult:
    if manifest.template is None:
        return CheckResult.not_possible("template", "the manifest has no template counts (written before moerun "
                                                    "fingerprint recorded them); rewrite it")
    cases, failures = [], []
    for case in manifest.template:
        body = {"messages": case.messages, "max_tokens": 1, "temperature": 0}
        if case.tools:
            body["tools"] = case.tools
        try:
            usage = endpoint.chat(body).get("usage")
        except Unanswered as e:
            if e.status != 400:
                return CheckResult.not_possible("template", str(e))
            failures.append(f"case {case.name}: the endpoint refused it ({e})")  # the reference's template renders it
            cases.append({"name": case.name, "expected": case.prompt_tokens, "prompt_tokens": None})
            continue
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(count, int):
            return CheckResult.not_possible("template", "the endpoint reports no usage.prompt_tokens")
        cases.append({"name": case.name, "expected": case.prompt_tokens, "prompt_tokens": count})
    differing = [c for c in cases if c["prompt_tokens"] != c["expected"]]
    deltas = {c["prompt_tokens"] - c["expected"] for c in differing if c["prompt_tokens"] is not None}
    if differing and len(differing) == len(cases) and len(deltas) == 1:
        delta = deltas.pop()
        failures.insert(0, f"every case has {delta:+d} token{'s' * (abs(delta) != 1)}: the frame around all of them "
                           f"differs (a token added or dropped at the start or end of the prompt, e.g. a second BOS)")
    elif differing and differing[0]["prompt_tokens"] is not None:
        first = differing[0]
        failures.insert(0, f"first case that differs: {first['name']} ({first['prompt_tokens']} prompt tokens, "
                           f"the checkpoint's template gives {first['expected']})")
    summary = (f"{len(cases)} cases, all as the checkpoint's template counts" if not differing else
               f"{len(cases) - len(differing)}/{len(cases)} as the checkpoint's template counts; first that differs: "
               f"{differing[0]['name']}")
    return CheckResult.judged("template", summary, {"cases": cases}, failures)
