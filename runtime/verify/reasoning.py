"""Reasoning, on every answer case (tool cases too: M2 reasons before it calls), against the reference answers
(runtime/verify/answers.py says which differences fail at once and which only in more than one case):

- separated: where the reference reasoned, the reasoning comes back apart (reasoning_content, or vLLM's newer
  `reasoning`), not left in the content with its <think>/</think> tags (a server without M2's reasoning parser);
- decisions: where the reference reasoned, the endpoint returns reasoning, not none; no reasoning tag in an answer
  whose reasoning did come back apart (the model wrote one) where the reference's has none; and no reasoning-only
  answer (one that ended by itself, finish "stop", with reasoning but no content and no tool call) where the
  reference answered with content or calls. On a model that does not answer within the budget (random weights)
  there is little to judge here."""

from __future__ import annotations

from moerun.runtime.parsers.reasoning import THINK_END, THINK_START
from moerun.runtime.verify.answers import Answer, parting_failure
from moerun.runtime.verify.report import CheckResult


def check_reasoning(answers: list[Answer] | str) -> CheckResult:
    if isinstance(answers, str):
        return CheckResult.not_possible("reasoning", answers)
    failures, cases, partings = [], [], {}
    for answer in answers:
        name, reference = answer.case.name, answer.case.reference
        tags = _has_tags(answer.content) and not _has_tags(reference["content"])
        if tags and not answer.reasoning and reference["reasoning"]:
            failures.append(f"case {name}: reasoning left in the content, tags and all (not separated)")
        elif tags:  # the reasoning came back apart (or there was none to split): the model wrote the tag
            partings[name] = "a reasoning tag in the answer"
        elif reference["reasoning"] and not answer.reasoning:
            partings[name] = f"no reasoning returned ({'content only' if answer.content else 'nothing'})"
        elif (reference["content"] or reference["tool_calls"]) and reasoning_only(answer):
            partings[name] = "a reasoning-only answer (it stopped with no content and no tool call)"
        cases.append({"name": name, "reasoning_chars": len(answer.reasoning or ""),
                      "content_chars": len(answer.content or ""), "tool_calls": len(answer.tool_calls),
                      "finish": answer.finish})
    failures = parting_failure(partings, len(answers)) + failures
    split = sum(1 for a in answers if a.reasoning)
    only = sum(1 for a in answers if reasoning_only(a))
    summary = f"{split}/{len(answers)} answers with reasoning returned apart, {only} reasoning-only"
    return CheckResult.judged("reasoning", summary, {"cases": cases, "partings": partings}, failures)


def _has_tags(content: str | None) -> bool:
    return any(tag in (content or "") for tag in (THINK_START, THINK_END))


def reasoning_only(answer: Answer) -> bool:
    return answer.finish == "stop" and bool(answer.reasoning) and not answer.content and not answer.tool_calls
