"""Tool calling, on the manifest's tool cases, against the reference answers (runtime/verify/answers.py says which
differences fail at once and which only in more than one case):

- decisions: the endpoint calls a tool where the reference did and not where it did not, and where the reference
  made parallel calls it makes as many;
- validity: every call names an offered tool and its arguments are a JSON object valid under that tool's schema
  (jsonschema), no fewer calls valid than the reference's;
- key order: a call's argument keys (nested objects too) in the order the reference's same call wrote them (a
  server that re-serializes arguments with sorted keys changes what the model wrote);
- parsed: where the reference called tools, the calls do not come back as markup in the content (a server without
  M2's tool-call parser); markup beside parsed calls is the model's own (a decision).
On a model that never calls a tool (random weights) the reference makes no calls and only the trigger is judged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema

from moerun.runtime.verify.answers import Answer, parting_failure
from moerun.runtime.verify.report import CheckResult

MARKUP = ("<minimax:tool_call>", "<invoke name=")


def check_tools(answers: list[Answer] | str) -> CheckResult:
    if isinstance(answers, str):
        return CheckResult.not_possible("tools", answers)
    tool_answers = [a for a in answers if a.case.kind == "tool"]
    if not tool_answers:
        return CheckResult.not_possible("tools", "the manifest has no tool cases")
    failures, invalid, cases, partings, reference_invalid = [], [], [], {}, 0
    for answer in tool_answers:
        name, reference, calls = answer.case.name, answer.case.reference["tool_calls"], answer.tool_calls
        problems = [invalid_call(call, answer.case.tools) for call in calls]
        invalid += [f"case {name}: {p}" for p in problems if p]
        reference_invalid += sum(1 for call in reference if invalid_call(call, answer.case.tools))
        markup = _has_markup(answer.content) and not _has_markup(answer.case.reference["content"])
        if markup and not calls and reference:
            failures.append(f"case {name}: the calls left in the content as markup (not parsed into tool_calls)")
        elif bool(reference) != bool(calls):
            partings[name] = f"{len(calls)} calls, the reference {len(reference)}"
        elif len(reference) >= 2 and len(calls) < len(reference):
            partings[name] = f"{len(calls)} call(s) where the reference made {len(reference)} in parallel"
        elif markup:  # the calls were parsed: the model wrote more markup into its answer
            partings[name] = "tool-call markup in the answer"
        failures += [f"case {name}: {p}" for p in _order_problems(calls, reference)]
        cases.append({"name": name, "calls": calls, "reference_calls": reference, "finish": answer.finish})
    failures = parting_failure(partings, len(tool_answers)) + failures
    if len(invalid) > reference_invalid:  # as many as the reference's are the model's own mistakes
        failures += invalid
    triggered = sum(1 for a in tool_answers if a.tool_calls)
    reference_triggered = sum(1 for a in tool_answers if a.case.reference["tool_calls"])
    calls = sum(len(a.tool_calls) for a in tool_answers)
    summary = (f"{triggered}/{len(tool_answers)} cases called tools (reference {reference_triggered}), "
               f"{calls - len(invalid)}/{calls} calls valid" + ("" if calls else " (no calls to validate)"))
    figures = {"cases": cases, "triggered": triggered, "reference_triggered": reference_triggered,
               "partings": partings, "calls": calls, "invalid_calls": invalid,
               "reference_invalid_calls": reference_invalid}
    return CheckResult.judged("tools", summary, figures, failures)


def _has_markup(content: str | None) -> bool:
    return any(m in (content or "") for m in MARKUP)


def invalid_call(call: dict[str, Any], tools: list[dict[str, Any]] | None) -> str | None:
    """What is wrong with one call (None when nothing is): an unknown tool, arguments that are not a JSON object,
    or arguments outside the tool's JSON schema."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {}
               for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    if call.get("name") not in schemas:
        return f"unknown tool {call.get('name')!r}"
    try:
        arguments = json.loads(call["arguments"]) if isinstance(call.get("arguments"), str) else None
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        return f"arguments of {call['name']} are not a JSON object"
    try:
        jsonschema.validate(arguments, schemas[call["name"]])
    except jsonschema.ValidationError as e:
        return f"arguments of {call['name']} break its schema ({e.message[:120]})"
    except jsonschema.SchemaError as e:
        return f"arguments of {call['name']} cannot be checked: its schema is invalid ({e.message[:120]})"
    return None


def _order_problems(calls: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[str]:
    out = []
    for i, (call, ref) in enumerate(zip(calls, reference)):
        if call.get("name") != ref["name"]:
            continue
        mine, theirs = _key_paths(call.get("arguments")), _key_paths(ref["arguments"])
        shared = set(mine) & set(theirs)
        mine, theirs = [k for k in mine if k in shared], [k for k in theirs if k in shared]
        if mine != theirs:
            out.append(f"call {i} ({call['name']}): argument keys in the order {mine}, the reference wrote {theirs}")
    return out


def _key_paths(arguments: Any) -> list[str]:
    """Every key of the arguments object, nested ones as a.b, in the order written."""
    try:
        value = json.loads(arguments, object_pairs_hook=list) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        return []
    return list(_walk(value, ""))


def _walk(value: Any, prefix: str) -> Iterator[str]:
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value) and value:
        for key, inner in value:  # an object, as object_pairs_hook=list gives it
            yield prefix + key
            yield from _walk(inner, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, f"{prefix}[].")
